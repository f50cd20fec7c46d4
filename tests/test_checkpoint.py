"""Checkpoint loading: both layouts against HF transformers, shard merging, errors, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (LLAMA3_TOKENIZER_PATH, make_random_model, meta_params_json, random_tokens, rel_err, tiny_args,
                     to_hf_model, write_hf_checkpoint, write_meta_checkpoint)
from llama3.checkpoint import check_vocab, detect_layout, find_tokenizer, load_model, save_meta_checkpoint
from llama3.keys import HF_TO_META, hf_to_meta_name, meta_to_hf_name, permute_rotary, unpermute_rotary

TOL = 1e-5
SEQ = 500
REPO = Path(__file__).resolve().parent.parent


def _write(layout: str, model, path: Path, hf_model=None) -> Path:
    if layout == "meta":
        return write_meta_checkpoint(model, path)
    if layout == "meta-2-shards":
        return write_meta_checkpoint(model, path, n_shards=2)
    return write_hf_checkpoint(model, path, sharded=layout == "hf-sharded", hf_model=hf_model)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- logits vs HF through files
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("factor", [8.0, 32.0])
@pytest.mark.parametrize("layout", ["meta", "meta-2-shards", "hf", "hf-sharded"])
def test_loaded_logits_match_hf(layout, factor, tie, tmp_path):
    model = make_random_model(tiny_args(rope_scaling_factor=factor, tie_word_embeddings=tie), seed=1)
    hf = to_hf_model(model)
    ckpt = _write(layout, model, tmp_path, hf_model=hf)
    if layout == "hf-sharded":
        assert (ckpt / "model.safetensors.index.json").is_file() and len(list(ckpt.glob("*.safetensors"))) > 2
    assert detect_layout(ckpt) == layout.split("-")[0]

    loaded = load_model(ckpt, dtype=torch.float32, max_seq_len=512)
    assert loaded.params.resolved_rope_scaling_factor == factor
    assert loaded.params.tie_word_embeddings == tie
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tie
    tokens = random_tokens(300, batch=2, seq=SEQ, seed=1)
    with torch.no_grad():
        ref = hf(tokens).logits
        out = loaded(tokens)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_wrong_rope_factor_in_the_config_fails_the_tolerance(layout, tmp_path):
    """Same weights, but the file says factor 8 where HF ran 32: the logits check must catch it."""
    model = make_random_model(tiny_args(rope_scaling_factor=32.0), seed=1)
    hf = to_hf_model(model)
    ckpt = _write(layout, model, tmp_path, hf_model=hf)
    config = ckpt / ("params.json" if layout == "meta" else "config.json")
    raw = json.loads(config.read_text())
    if layout == "meta":
        raw["rope_scaling_factor"] = 8.0
    else:
        raw["rope_parameters"]["factor"] = 8.0
    config.write_text(json.dumps(raw))
    loaded = load_model(ckpt, dtype=torch.float32)
    assert loaded.params.resolved_rope_scaling_factor == 8.0
    tokens = random_tokens(300, batch=2, seq=SEQ, seed=1)
    with torch.no_grad():
        assert rel_err(loaded(tokens), hf(tokens).logits) > TOL


def test_hf_config_with_rope_scaling_block(tmp_path):
    """Configs written by transformers 4.x / on the Hub carry ``rope_scaling`` and a top-level rope_theta."""
    model = make_random_model(tiny_args(rope_scaling_factor=8.0), seed=1)
    ckpt = write_hf_checkpoint(model, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (ckpt / "config.json").write_text(json.dumps(raw))
    loaded = load_model(ckpt, dtype=torch.float32)
    p = loaded.params
    assert p.use_scaled_rope and p.resolved_rope_scaling_factor == 8.0 and p.rope_theta == 500000.0
    _assert_same_weights(loaded, model)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_unscaled_rope_and_other_theta(layout, tmp_path):
    """Llama 3.0-style RoPE (no scaling, here theta 10000): transformers 5 writes rope_parameters with
    rope_type "default" and the theta inside it."""
    model = make_random_model(tiny_args(use_scaled_rope=False, rope_theta=10000.0), seed=2)
    hf = to_hf_model(model)
    ckpt = _write(layout, model, tmp_path, hf_model=hf)
    loaded = load_model(ckpt, dtype=torch.float32)
    assert not loaded.params.use_scaled_rope and loaded.params.rope_theta == 10000.0
    tokens = random_tokens(300, batch=2, seq=SEQ, seed=2)
    with torch.no_grad():
        assert rel_err(loaded(tokens), hf(tokens).logits) <= TOL


# --------------------------------------------------------------------------- layouts and names
def test_key_table_round_trips_and_rotary_permutation_inverts():
    for hf_name, meta_name in HF_TO_META.items():
        hf_name, meta_name = hf_name.format(7), meta_name.format(7)
        assert hf_to_meta_name(hf_name) == meta_name and meta_to_hf_name(meta_name) == hf_name
    assert hf_to_meta_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    w = torch.randn(8 * 16, 64)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 8), 8), w)
    assert not torch.equal(permute_rotary(w, 8), w)


def test_load_model_matches_the_written_weights_in_every_layout(tmp_path):
    model = make_random_model(seed=3)
    for layout in ("meta", "meta-2-shards", "hf", "hf-sharded"):
        _assert_same_weights(load_model(_write(layout, model, tmp_path / layout), dtype=torch.float32), model)


@pytest.mark.parametrize("n_shards", [2, 4])
@pytest.mark.parametrize("embedding_split_dim", [0, 1], ids=["vocab-parallel", "llama2-embedding"])
def test_meta_model_parallel_shards_merge_to_the_single_file(n_shards, embedding_split_dim, tmp_path):
    """n_kv_heads=2, so 4 shards also exercise kv heads repeated over consecutive ranks (405B MP16 style)."""
    model = make_random_model(tiny_args(tie_word_embeddings=embedding_split_dim == 0), seed=4)
    single = load_model(write_meta_checkpoint(model, tmp_path / "one"), dtype=torch.float32)
    ckpt = write_meta_checkpoint(model, tmp_path / "many", n_shards=n_shards, embedding_split_dim=embedding_split_dim)
    shard0 = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    emb = shard0["tok_embeddings.weight"].shape
    assert emb == ((300 // n_shards, 64) if embedding_split_dim == 0 else (300, 64 // n_shards))
    assert shard0["layers.0.attention.wo.weight"].shape == (64, 64 // n_shards)
    merged = load_model(ckpt, dtype=torch.float32)
    _assert_same_weights(merged, single)
    _assert_same_weights(merged, model)


def test_merging_shards_converts_dtype_on_the_fly(tmp_path):
    model = make_random_model(seed=4)
    ckpt = write_meta_checkpoint(model, tmp_path, n_shards=2)
    loaded = load_model(ckpt)  # default bf16
    for name, p in loaded.state_dict().items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, model.state_dict()[name].bfloat16()), name


@pytest.mark.parametrize("variant", ["shared-storage", "no-output", "separate-copy"])
def test_meta_tied_head_variants(variant, tmp_path):
    """Meta files of a tied model may store output.weight as the embedding's storage, omit it, or copy it."""
    model = make_random_model(tiny_args(tie_word_embeddings=True), seed=5)
    ckpt = write_meta_checkpoint(model, tmp_path, with_output=variant != "no-output",
                                 share_tied=variant == "shared-storage")
    params = json.loads((ckpt / "params.json").read_text())
    assert "tie_word_embeddings" not in params  # as in Meta's own params.json
    loaded = load_model(ckpt, dtype=torch.float32)
    tied = variant != "separate-copy"  # an equal separate copy loads as a separate (equal) head
    assert loaded.params.tie_word_embeddings == tied
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tied
    tokens = random_tokens(300, 1, 32)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_dtype_device_and_no_global_side_effects(tmp_path):
    model = make_random_model(seed=6)
    ckpt = write_meta_checkpoint(model, tmp_path)
    loaded = load_model(ckpt, max_seq_len=128, max_batch_size=3)  # default dtype: bfloat16
    assert torch.get_default_dtype() == torch.float32
    assert torch.empty(1).device.type == "cpu"
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.rope_cos.dtype == torch.float32 and loaded.rope_cos.shape[0] == 128
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.params.max_seq_len == 128 and loaded.params.max_batch_size == 3
    assert loaded.cache_shape is None  # the cache is generation's business
    assert not loaded.training
    with torch.no_grad():
        out = loaded(random_tokens(300, 1, 16))
    assert out.dtype == torch.float32
    kept = load_model(ckpt, dtype=None)  # None keeps the stored dtype
    assert all(p.dtype == torch.float32 for p in kept.parameters())


def test_load_model_passes_hooks_and_checks_them_first(tmp_path):
    model = make_random_model(seed=7)
    ckpt = write_meta_checkpoint(model, tmp_path)
    loaded = load_model(ckpt, dtype=torch.float32, store_layer_activ=(s for s in ["L1A", 0]),  # any iterable
                        sae_layer_forward_fn={"L0R": lambda x: x})
    tokens = random_tokens(300, 1, 16)
    assert set(loaded.forward_activations(tokens)) == {"L1A", "L0R"}
    (ckpt / "consolidated.00.pth").write_bytes(b"not read")  # a bad site fails before the weights are read
    with pytest.raises(ValueError, match="past the last layer"):
        load_model(ckpt, store_layer_activ=["L9R"])


def test_save_meta_checkpoint_round_trip(tmp_path):
    model = make_random_model(tiny_args(tie_word_embeddings=True, rope_scaling_factor=8.0), seed=8)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer bytes")
    ckpt = save_meta_checkpoint(model, tmp_path / "ckpt", tokenizer_path=tok)
    assert sorted(p.name for p in ckpt.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert (ckpt / "tokenizer.model").read_bytes() == b"tokenizer bytes"
    params = json.loads((ckpt / "params.json").read_text())
    assert params["rope_scaling_factor"] == 8.0 and params["tie_word_embeddings"] is True
    assert "max_seq_len" not in params
    sd = torch.load(ckpt / "consolidated.00.pth", weights_only=True, mmap=True)
    assert "output.weight" in sd  # Meta's reference loads it strictly
    loaded = load_model(ckpt, dtype=torch.float32)
    _assert_same_weights(loaded, model)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert loaded.params.resolved_rope_scaling_factor == 8.0


# --------------------------------------------------------------------------- file errors
def test_detect_layout_errors_list_expected_and_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_layout(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="params.json.*config.json.*empty"):
        detect_layout(tmp_path)
    model = make_random_model()
    ckpt = write_meta_checkpoint(model, tmp_path / "meta")
    (ckpt / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no params\.json.*found: consolidated\.00\.pth"):
        load_model(ckpt)
    ckpt = write_meta_checkpoint(model, tmp_path / "noweights")
    (ckpt / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"params\.json but no consolidated\.\*\.pth.*found: params\.json"):
        load_model(ckpt)
    ckpt = write_hf_checkpoint(model, tmp_path / "hf")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json but no model\.safetensors.*found: config\.json"):
        load_model(ckpt)


def test_hf_index_naming_a_missing_shard(tmp_path):
    ckpt = write_hf_checkpoint(make_random_model(), tmp_path, sharded=True)
    victim = sorted(ckpt.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(ckpt)


def test_meta_shard_gap(tmp_path):
    ckpt = write_meta_checkpoint(make_random_model(), tmp_path, n_shards=4)
    (ckpt / "consolidated.02.pth").unlink()
    with pytest.raises(FileNotFoundError, match="without gaps"):
        load_model(ckpt)


def test_find_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model.*original/tokenizer\.model"):
        find_tokenizer(tmp_path)
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(tmp_path) == tmp_path / "original" / "tokenizer.model"
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"


# --------------------------------------------------------------------------- tensor errors
def _edit_meta(ckpt: Path, edit) -> None:
    path = ckpt / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


def _edit_hf(ckpt: Path, edit) -> None:
    path = ckpt / "model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    model = make_random_model()
    meta = write_meta_checkpoint(model, tmp_path / "meta")
    _edit_meta(meta, lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: layers\.1\.feed_forward\.w3\.weight"):
        load_model(meta)
    hf = write_hf_checkpoint(model, tmp_path / "hf")
    _edit_hf(hf, lambda sd: sd.pop("model.layers.0.post_attention_layernorm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.0\.post_attention_layernorm\.weight"):
        load_model(hf)


def test_unexpected_tensor_is_named(tmp_path):
    model = make_random_model()
    meta = write_meta_checkpoint(model, tmp_path / "meta")
    _edit_meta(meta, lambda sd: sd.update({"layers.2.attention.wq.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: layers\.2\.attention\.wq\.weight"):
        load_model(meta)
    hf = write_hf_checkpoint(model, tmp_path / "hf")
    _edit_hf(hf, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(hf)


def test_derived_rotary_buffers_are_skipped(tmp_path):
    """Llama 2 style rope.freqs / old HF inv_freq are recomputed, not reported."""
    model = make_random_model()
    meta = write_meta_checkpoint(model, tmp_path / "meta")
    _edit_meta(meta, lambda sd: sd.update({"rope.freqs": torch.zeros(8)}))
    _assert_same_weights(load_model(meta, dtype=torch.float32), model)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    model = make_random_model()
    meta = write_meta_checkpoint(model, tmp_path / "meta")
    _edit_meta(meta, lambda sd: sd.update({"layers.0.attention.wk.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError) as err:
        load_model(meta)
    msg = str(err.value)
    assert "layers.0.attention.wk.weight" in msg and "(64, 64)" in msg and "(32, 64)" in msg
    # HF: a config that does not belong to the weights; every wrong tensor is listed at once
    hf = write_hf_checkpoint(model, tmp_path / "hf")
    raw = json.loads((hf / "config.json").read_text())
    raw["intermediate_size"] = 160
    (hf / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        load_model(hf)
    msg = str(err.value)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.1.mlp.{name}.weight" in msg
    assert "(192, 64)" in msg and "(160, 64)" in msg and "(64, 192)" in msg and "(64, 160)" in msg


def test_shards_that_do_not_merge_to_the_config_shape(tmp_path):
    model = make_random_model()
    params = {**meta_params_json(model.params), "multiple_of": 256}  # implies hidden_dim 256, not 192
    ckpt = write_meta_checkpoint(model, tmp_path, n_shards=2, params=params)
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.w1\.weight: the checkpoint has \(192, 64\) "
                                         r"\(merged from 2 shards\), params\.json implies \(256, 64\)"):
        load_model(ckpt)


def test_replicated_norm_that_differs_between_shards(tmp_path):
    ckpt = write_meta_checkpoint(make_random_model(), tmp_path, n_shards=2)
    path = ckpt / "consolidated.01.pth"
    sd = torch.load(path, weights_only=True)
    sd["layers.1.ffn_norm.weight"] = sd["layers.1.ffn_norm.weight"] + 1
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"layers\.1\.ffn_norm\.weight is replicated.*shard 1 differs"):
        load_model(ckpt)


def test_repeated_kv_heads_that_differ(tmp_path):
    ckpt = write_meta_checkpoint(make_random_model(), tmp_path, n_shards=4)
    path = ckpt / "consolidated.01.pth"
    sd = torch.load(path, weights_only=True)
    sd["layers.0.attention.wk.weight"] = sd["layers.0.attention.wk.weight"] + 1
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"attention\.wk\.weight: shards 0 and 1 should hold the same kv head"):
        load_model(ckpt)


def test_hf_head_tying_disagreements(tmp_path):
    model = make_random_model(tiny_args(tie_word_embeddings=True))
    ckpt = write_hf_checkpoint(model, tmp_path / "a")  # tied: save_pretrained drops lm_head.weight
    raw = json.loads((ckpt / "config.json").read_text())
    raw["tie_word_embeddings"] = False
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="tie_word_embeddings=false.*no lm_head.weight"):
        load_model(ckpt)
    ckpt = write_hf_checkpoint(model, tmp_path / "b")
    _edit_hf(ckpt, lambda sd: sd.update({"lm_head.weight": torch.randn(300, 64)}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_model(ckpt)
    ckpt = write_hf_checkpoint(model, tmp_path / "c")  # an equal lm_head stored anyway is fine
    _edit_hf(ckpt, lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone()}))
    loaded = load_model(ckpt, dtype=torch.float32)
    assert loaded.output.weight is loaded.tok_embeddings.weight


def test_truncated_weight_file_names_the_file(tmp_path):
    ckpt = write_meta_checkpoint(make_random_model(), tmp_path)
    path = ckpt / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read .*consolidated\.00\.pth"):
        load_model(ckpt)


# --------------------------------------------------------------------------- config and vocab
def test_unknown_config_keys_are_warned_about(tmp_path):
    model = make_random_model()
    meta = write_meta_checkpoint(model, tmp_path / "meta")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "moe_num_experts": 4}))
    with pytest.warns(UserWarning, match="moe_num_experts"):
        load_model(meta)
    hf = write_hf_checkpoint(model, tmp_path / "hf")
    raw = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**raw, "sliding_window": 4096}))
    with pytest.warns(UserWarning, match="sliding_window"):
        load_model(hf)


def test_check_vocab():
    params = tiny_args()
    check_vocab(params, 300)
    with pytest.raises(ValueError, match=r"vocab_size=300.*n_words=128256"):
        check_vocab(params, 128256)


@pytest.mark.skipif(LLAMA3_TOKENIZER_PATH is None, reason="needs the llama-models tokenizer file")
def test_vocab_mismatch_with_the_real_tokenizer(tmp_path):
    from llama3.tokenizer import Tokenizer

    ckpt = write_meta_checkpoint(make_random_model(), tmp_path, tokenizer_path=LLAMA3_TOKENIZER_PATH)
    n_words = Tokenizer(find_tokenizer(ckpt)).n_words
    assert n_words == 128256
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        check_vocab(load_model(ckpt).params, n_words)
    from llama3 import Llama  # Llama.build runs the same check

    with pytest.raises(ValueError, match="vocabulary mismatch"):
        Llama.build(ckpt, max_seq_len=64, max_batch_size=1, device="cpu", dtype=torch.float32)


# --------------------------------------------------------------------------- memory
_MEASURE = r"""
import json, sys, torch
from llama3.checkpoint import load_model

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

# One-time costs that do not scale with the model (the first module built on the meta device pulls in
# ~70 MB of torch internals; safetensors' import) are paid before measuring.
import safetensors.torch
with torch.device("meta"):
    torch.nn.Embedding(2, 2)

try:  # reset the high-water mark to the current RSS (Linux >= 4.0); else it is an upper bound
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = status()
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
after = status()
print(json.dumps({"before": before, "after": after,
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def _measure_load(ckpt: Path, dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(ckpt), dtype], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["peak_growth"] = r["after"]["VmHWM"] - r["before"]["VmRSS"]
    r["anon_growth"] = r["after"]["RssAnon"] - r["before"]["RssAnon"]
    return r


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc")
def test_loading_memory_stays_near_the_weights_size(tmp_path):
    """A ~55 MB fp32 model, each load measured in a fresh process.

    Meta fp32 -> fp32 must be zero-copy (the parameters are the mapped file): measured 0.01x anonymous
    growth and 0.13x peak growth; a copy of the weights would add >= 1.0x.
    HF fp32 -> bf16 may read the mapped fp32 pages once and allocate the bf16 weights once (measured:
    file + 1.1x bf16 at the peak), but must not materialise a second copy (an extra bf16 copy would
    reach file + 2x bf16, an extra fp32 copy file + 3x)."""
    args = tiny_args(dim=512, n_layers=3, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=256)
    model = make_random_model(args, seed=0)
    file_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert 45e6 < file_bytes < 70e6
    meta = write_meta_checkpoint(model, tmp_path / "meta")
    hf = write_hf_checkpoint(model, tmp_path / "hf")
    del model

    r = _measure_load(meta, "float32")
    assert r["param_bytes"] == file_bytes
    assert r["anon_growth"] < 0.2 * file_bytes, r
    assert r["peak_growth"] < 0.5 * file_bytes, r

    r = _measure_load(hf, "bfloat16")
    bf16_bytes = r["param_bytes"]
    assert bf16_bytes == file_bytes // 2
    assert r["anon_growth"] < 1.3 * bf16_bytes, r
    assert r["peak_growth"] < file_bytes + 1.5 * bf16_bytes, r


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["meta-2-shards", "hf-sharded"])
def test_load_onto_cuda(layout, tmp_path):
    model = make_random_model(tiny_args(tie_word_embeddings=True), seed=11)
    ckpt = _write(layout, model, tmp_path)
    loaded = load_model(ckpt, device="cuda", dtype=torch.float32)
    assert all(t.device.type == "cuda" for t in [*loaded.parameters(), *loaded.buffers()])
    tokens = random_tokens(300, 2, 64)
    with torch.no_grad():
        assert rel_err(loaded(tokens.cuda()).cpu(), model(tokens)) <= 1e-4  # TF32/kernels may differ slightly
