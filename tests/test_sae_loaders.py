"""Loaders for published SAE layouts and export to SAELens.

Each test writes a synthetic checkpoint in the other library's layout and compares what ``load_sae``
computes with the other library's documented formulas, written out here in plain torch.
"""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from llama3.model import Site
from sae import SAEConfig, SparseAutoencoder, detect_format, export_sae_lens, hook_name_to_site, load_sae
from sae.loaders import site_to_hook_name

D, L = 16, 64


def rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs(n=40, seed=11, norm=None):
    x = rand(n, D, seed=seed) + 0.3
    if norm is not None:  # residual streams are large: give the tokens a realistic average norm
        x = x / x.norm(dim=1).mean() * norm
    return x


# ----------------------------------------------------------------------------- SAELens reference
def saelens_forward(cfg: dict, t: dict, x: torch.Tensor):
    """SAELens 6 inference: returns (feature_acts, sae_out)."""
    norm = cfg.get("normalize_activations", "none")
    if norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        sae_in = xc / (std + 1e-5)
    else:
        sae_in = x
    if cfg.get("apply_b_dec_to_input", True):
        sae_in = sae_in - t["b_dec"]
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    W_dec = t["W_dec"]
    arch = cfg.get("architecture", "standard")
    if arch == "topk" or cfg.get("activation_fn_str") == "topk":
        k = cfg["k"] if "k" in cfg else cfg["activation_fn_kwargs"]["k"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * W_dec.norm(dim=-1)
        top = pre.topk(k, dim=-1)
        feats = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        if cfg.get("rescale_acts_by_decoder_norm"):
            dec_in = feats / W_dec.norm(dim=-1)
        else:
            dec_in = feats
    elif arch == "jumprelu":
        feats = torch.relu(pre) * (pre > t["threshold"])
        dec_in = feats
    else:
        feats = torch.relu(pre)
        dec_in = feats
    if "scaling_factor" in t:
        dec_in = dec_in * t["scaling_factor"]
    out = dec_in @ W_dec + t["b_dec"]
    if norm == "layer_norm":
        out = out * std + mu
    return feats, out


def write_saelens(path, cfg, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "sae_weights.safetensors")
    return path


def saelens_tensors(seed=0, threshold=False):
    t = {"W_enc": rand(D, L, seed=seed, scale=0.3), "W_dec": rand(L, D, seed=seed + 1, scale=0.3),
         "b_enc": rand(L, seed=seed + 2, scale=0.1), "b_dec": rand(D, seed=seed + 3, scale=0.2)}
    if threshold:
        t["threshold"] = rand(L, seed=seed + 4).abs() * 0.3
    return t


V6_META = {"model_name": "meta-llama/Llama-3.2-1B", "hook_name": "blocks.5.hook_resid_post", "hook_layer": 5,
           "hook_head_index": None, "sae_lens_version": "6.5.0"}


@pytest.mark.parametrize("variant", ["topk", "jumprelu", "standard", "layer_norm", "rescale", "pre6_topk",
                                     "pre6_relu_scaling"])
def test_sae_lens_layouts(tmp_path, variant):
    t = saelens_tensors(threshold=variant == "jumprelu")
    base = {"d_in": D, "d_sae": L, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none", "metadata": V6_META}
    if variant == "topk":
        cfg = {**base, "architecture": "topk", "k": 5}
    elif variant == "jumprelu":
        cfg = {**base, "architecture": "jumprelu", "apply_b_dec_to_input": False}
    elif variant == "standard":
        cfg = {**base, "architecture": "standard"}
    elif variant == "layer_norm":
        cfg = {**base, "architecture": "topk", "k": 5, "normalize_activations": "layer_norm"}
    elif variant == "rescale":
        cfg = {**base, "architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True}
    elif variant == "pre6_topk":
        cfg = {"d_in": D, "d_sae": L, "dtype": "float32", "hook_name": "blocks.3.hook_mlp_out", "hook_layer": 3,
               "model_name": "llama", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
               "apply_b_dec_to_input": True, "normalize_activations": False}
        cfg["architecture"] = "standard"
    else:
        cfg = {"d_in": D, "d_sae": L, "dtype": "float32", "hook_point": "blocks.3.hook_resid_pre",
               "activation_fn_str": "relu", "apply_b_dec_to_input": True}
        t["scaling_factor"] = rand(L, seed=9).abs() + 0.5
    path = write_saelens(tmp_path / variant, cfg, t)
    assert detect_format(path) == "sae_lens"
    sae = load_sae(path)
    x = inputs()
    feats, out = saelens_forward(cfg, t, x)
    with torch.no_grad():
        # (rescale_acts_by_decoder_norm: the norm is folded into our encoder, so the codes agree too.)
        torch.testing.assert_close(sae.encode(x), feats, rtol=1e-4, atol=1e-5)
        tol = 2e-4 if variant == "layer_norm" else 1e-5  # SAELens undoes layer_norm with std, we with std+eps
        torch.testing.assert_close(sae.reconstruct(x), out, rtol=tol, atol=tol)
    expected_site = {"pre6_topk": "L3M", "pre6_relu_scaling": "L3RP"}.get(variant, "L5R")
    assert sae.cfg.site == expected_site
    assert sae.cfg.source["format"] == "sae_lens"


def test_sae_lens_unsupported_layouts_are_clear_errors(tmp_path):
    t = saelens_tensors()
    base = {"d_in": D, "d_sae": L, "dtype": "float32", "apply_b_dec_to_input": True, "metadata": V6_META}
    meta_z = {**V6_META, "hook_name": "blocks.5.attn.hook_z"}
    with pytest.raises(ValueError, match="hook_z"):
        load_sae(write_saelens(tmp_path / "z", {**base, "architecture": "standard", "metadata": meta_z}, t))
    with pytest.raises(ValueError, match="matryoshka"):
        load_sae(write_saelens(tmp_path / "m", {**base, "architecture": "matryoshka_batchtopk"}, t))
    tc = {**base, "architecture": "transcoder", "apply_b_dec_to_input": False,
          "metadata": {**V6_META, "hook_name": "blocks.5.ln2.hook_normalized", "hook_name_out": "blocks.5.hook_mlp_out"}}
    with pytest.raises(ValueError, match="d_out == d_in"):
        load_sae(write_saelens(tmp_path / "w", {**tc, "d_out": D + 1}, t))
    with pytest.raises(ValueError, match="normalises its input but not its output"):
        load_sae(write_saelens(tmp_path / "n", {**tc, "normalize_activations": "layer_norm"}, t))
    wrong = {**tc, "metadata": {**tc["metadata"], "hook_name_out": "blocks.6.hook_mlp_out"}}
    with pytest.raises(ValueError, match="same block"):
        load_sae(write_saelens(tmp_path / "o", wrong, t))
    meta_ln = {**V6_META, "hook_name": "blocks.5.ln1.hook_normalized"}
    sae = load_sae(write_saelens(tmp_path / "ln", {**base, "architecture": "standard", "apply_b_dec_to_input": False,
                                                    "metadata": meta_ln}, t))
    assert sae.cfg.site == "L5AI" and sae.cfg.source["input_before_norm_weight"] == "attn_in"
    with pytest.raises(ValueError, match="says the SAE reads L5R"):
        load_sae(write_saelens(tmp_path / "ok", {**base, "architecture": "standard"}, t), site="L6R")


# ----------------------------------------------------------------------------- Llama Scope
def write_llama_scope(path, hp, tensors):
    (path / "checkpoints").mkdir(parents=True)
    (path / "hyperparams.json").write_text(json.dumps(hp))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "checkpoints" / "final.safetensors")
    return path


def lm_saes_v1(hp: dict, tensors: dict, x: torch.Tensor):
    """Reference: what lm-saes 1.x computes for a published Llama Scope directory, written from
    ``SparseAutoEncoder.from_pretrained`` / ``encode`` / ``decode`` in OpenMOSS/Language-Model-SAEs at v1.1.0
    (commit e20105818d97169090856ce0485b9767e95b7bb3, src/lm_saes/sae.py), step by step on the state dict."""
    sd = {k: v.clone().double() for k, v in tensors.items()}
    d = hp["d_model"]
    norm = hp.get("norm_activation", "token-wise")
    if norm == "dataset-wise":  # standardize_parameters_of_dataset_activation_scaling
        f_in = math.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
        f_out = math.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
        sd["encoder.bias"] = sd["encoder.bias"] / f_in
        sd["decoder.bias"] = sd["decoder.bias"] / f_out
        sd["decoder.weight"] = sd["decoder.weight"] * f_in / f_out
        norm = "inference"
    if hp.get("sparsity_include_decoder_norm", True):  # transform_to_unit_decoder_norm
        n = sd["decoder.weight"].norm(p=2, dim=0)
        sd["decoder.weight"] = sd["decoder.weight"] / n
        sd["encoder.weight"] = sd["encoder.weight"] * n[:, None]
        sd["encoder.bias"] = sd["encoder.bias"] * n
    act = hp.get("act_fn", "relu")
    thr = hp.get("jump_relu_threshold", 0.0)
    if act == "topk" and thr > 0:
        act = "jumprelu"
    assert norm == "inference"  # compute_norm_factor is then 1
    xx = x.double()
    if hp.get("use_decoder_bias", True) and hp.get("apply_decoder_bias_to_pre_encoder", True):
        xx = xx - sd["decoder.bias"]
    pre = xx @ sd["encoder.weight"].T + sd["encoder.bias"]
    if act == "jumprelu":
        acts = pre.where(pre > thr, 0)
    elif act == "topk":
        r = pre.clamp(min=0.0)
        score = r * sd["decoder.weight"].norm(p=2, dim=0) if hp.get("sparsity_include_decoder_norm", True) else r
        idx = score.topk(hp["top_k"], dim=-1).indices
        acts = torch.zeros_like(r).scatter(-1, idx, r.gather(-1, idx))
    else:
        acts = pre.clamp(min=0.0)
    out = acts @ sd["decoder.weight"].T + sd["decoder.bias"]
    return acts.float(), out.float()


@pytest.mark.parametrize("norm_out", [24.0, 6.0])
def test_llama_scope_release_jumprelu_computes_as_lm_saes_1x(tmp_path, norm_out):
    norm_in = 24.0
    enc_w, enc_b = rand(L, D, seed=1, scale=0.35), rand(L, seed=2, scale=0.1)
    dec_w, dec_b = rand(D, L, seed=3, scale=0.2), rand(D, seed=4, scale=0.5)
    dec_w = dec_w * (rand(L, seed=5).abs() + 0.4)  # uneven decoder column norms
    hp = {"d_model": D, "d_sae": L, "act_fn": "jumprelu", "jump_relu_threshold": 0.0, "top_k": 50,
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": norm_in, "out": norm_out},
          "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True, "sparsity_include_decoder_norm": True,
          "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post"}
    tensors = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "decoder.bias": dec_b}
    x = inputs(200, norm=norm_in)  # tokens with the dataset's average norm
    # A threshold at the scale of the folded codes (as in the release): about a third of the latents fire.
    hp["jump_relu_threshold"] = float(lm_saes_v1({**hp, "jump_relu_threshold": 0.0}, tensors, x)[0].quantile(0.8))
    path = write_llama_scope(tmp_path / "L15R", hp, tensors)
    (path / "lm_config.json").write_text(json.dumps({"model_name": "meta-llama/Llama-3.1-8B"}))
    assert detect_format(path) == "llama_scope"
    sae = load_sae(path)
    acts, out = lm_saes_v1(hp, tensors, x)
    with torch.no_grad():
        h = sae.encode(x)
        assert torch.equal(h > 0, acts > 0)
        torch.testing.assert_close(h, acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.reconstruct(x), out, rtol=1e-5, atol=1e-5)
    # The old reading (the threshold in the normalised space) gives a very different L0: this test can tell.
    x_n = x * math.sqrt(D) / norm_in
    wrong_l0 = float(((x_n @ enc_w.T + enc_b) > hp["jump_relu_threshold"]).sum(-1).float().mean())
    l0 = float((acts > 0).sum(-1).float().mean())
    assert abs(wrong_l0 - l0) > 3, (wrong_l0, l0)
    assert sae.cfg.site == "L15R" and sae.cfg.normalization == "none"
    assert sae.cfg.model_name == "meta-llama/Llama-3.1-8B"
    assert sae.cfg.source["norm_factors_folded"]["in"] == pytest.approx(math.sqrt(D) / norm_in)


def test_llama_scope_release_topk_with_decoder_norm_ranking_and_pre_encoder_bias(tmp_path):
    enc_w, enc_b = rand(L, D, seed=5, scale=0.3), rand(L, seed=6, scale=0.1)
    dec_w, dec_b = rand(D, L, seed=7, scale=0.3), rand(D, seed=8, scale=0.2)
    dec_w = dec_w * (rand(L, seed=9).abs() + 0.4)
    hp = {"d_model": D, "d_sae": L, "act_fn": "topk", "top_k": 6, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": 10.0, "out": 7.0}, "apply_decoder_bias_to_pre_encoder": True,
          "use_decoder_bias": True, "sparsity_include_decoder_norm": True,
          "hook_point_in": "blocks.3.hook_mlp_out", "hook_point_out": "blocks.3.hook_mlp_out"}
    tensors = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "decoder.bias": dec_b}
    path = write_llama_scope(tmp_path / "m", hp, tensors)
    sae = load_sae(path)
    x = inputs(norm=10.0)
    acts, out = lm_saes_v1(hp, tensors, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.reconstruct(x), out, rtol=1e-5, atol=1e-5)
    assert sae.cfg.site == "L3M" and sae.cfg.architecture == "topk"
    # A positive jump_relu_threshold makes lm-saes run the TopK SAE as a JumpReLU at inference.
    hp2 = {**hp, "jump_relu_threshold": 0.3}
    path2 = write_llama_scope(tmp_path / "m2", hp2, tensors)
    acts2, out2 = lm_saes_v1(hp2, tensors, x)
    sae2 = load_sae(path2)
    assert sae2.cfg.architecture == "jumprelu"
    with torch.no_grad():
        torch.testing.assert_close(sae2.encode(x), acts2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae2.reconstruct(x), out2, rtol=1e-5, atol=1e-5)


def test_llama_scope_release_transcoder_reads_ln2_before_the_norm_weight(tmp_path):
    from helpers import make_random_model, tiny_args

    hp = {"d_model": D, "d_sae": L, "act_fn": "jumprelu", "jump_relu_threshold": 0.05,
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 4.0, "out": 2.0},
          "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": True,
          "hook_point_in": "blocks.1.ln2.hook_normalized", "hook_point_out": "blocks.1.hook_mlp_out"}
    tensors = {"encoder.weight": rand(L, D, seed=1, scale=0.3), "encoder.bias": rand(L, seed=2, scale=0.1),
               "decoder.weight": rand(D, L, seed=3, scale=0.3), "decoder.bias": rand(D, seed=4, scale=0.1)}
    path = write_llama_scope(tmp_path / "tc", hp, tensors)
    sae = load_sae(path)
    assert sae.cfg.site == "L1TC" and sae.cfg.is_transcoder
    model = make_random_model(tiny_args(dim=D, n_heads=2, n_kv_heads=1, multiple_of=16), norm_jitter=0.5)
    from sae import bind_to_model

    bind_to_model(sae, model)
    x_tl = inputs(norm=4.0)
    acts, out = lm_saes_v1(hp, tensors, x_tl)
    mlp_in = x_tl * model.layers[1].ffn_norm.weight.detach()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(mlp_in), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.reconstruct(mlp_in), out, rtol=1e-5, atol=1e-5)
    bind_to_model(sae, model)  # folding twice would divide by the weight twice: it is done once
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(mlp_in), out, rtol=1e-5, atol=1e-5)


def test_llama_scope_release_refuses_what_it_cannot_compute(tmp_path):
    base = {"d_model": D, "d_sae": L, "act_fn": "jumprelu", "jump_relu_threshold": 0.1,
            "hook_point_in": "blocks.3.hook_resid_post"}
    t = {"encoder.weight": rand(L, D), "encoder.bias": rand(L), "decoder.weight": rand(D, L), "decoder.bias": rand(D)}
    with pytest.raises(ValueError, match="token-wise"):
        load_sae(write_llama_scope(tmp_path / "a", {**base, "norm_activation": "token-wise"}, t))
    with pytest.raises(ValueError, match="dataset_average_activation_norm"):
        load_sae(write_llama_scope(tmp_path / "b", {**base, "norm_activation": "dataset-wise"}, t))
    with pytest.raises(ValueError, match="MLP input"):
        load_sae(write_llama_scope(tmp_path / "c", {**base, "norm_activation": "inference",
                                                    "hook_point_out": "blocks.4.hook_resid_post"}, t))


# ----------------------------------------------------------------------------- sparsify
@pytest.mark.parametrize("hookpoint,site", [("layers.6", "L6R"), ("layers.6.mlp", "L6M")])
def test_sparsify_layout(tmp_path, hookpoint, site):
    enc_w, enc_b = rand(L, D, seed=1, scale=0.3), rand(L, seed=2, scale=0.1)
    W_dec, b_dec = rand(L, D, seed=3, scale=0.3), rand(D, seed=4, scale=0.3)
    path = tmp_path / hookpoint
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": L // D,
                                               "normalize_decoder": True, "num_latents": 0, "k": 7,
                                               "multi_topk": False, "skip_connection": False, "d_in": D}))
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}, path / "sae.safetensors")
    assert detect_format(path) == "sparsify"
    sae = load_sae(path)
    x = inputs()
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    top = pre.topk(7, dim=-1)
    out = (top.values[..., None] * W_dec[top.indices]).sum(-2) + b_dec
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), torch.zeros_like(pre).scatter(-1, top.indices, top.values))
        torch.testing.assert_close(sae.reconstruct(x), out, rtol=1e-5, atol=1e-5)
    assert sae.cfg.site == site
    # The parent directory of several hookpoints says which to pick.
    with pytest.raises(ValueError, match=hookpoint.replace(".", r"\.")):
        load_sae(tmp_path)


# ----------------------------------------------------------------------------- Goodfire
def test_goodfire_state_dict(tmp_path):
    state = {"encoder_linear.weight": rand(L, D, seed=1, scale=0.3).bfloat16(),
             "encoder_linear.bias": rand(L, seed=2, scale=0.1).bfloat16(),
             "decoder_linear.weight": rand(D, L, seed=3, scale=0.3).bfloat16(),
             "decoder_linear.bias": rand(D, seed=4).bfloat16()}
    f = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save(state, f)
    assert detect_format(f) == "goodfire"
    sae = load_sae(f, site="L19R", model_name="meta-llama/Llama-3.1-8B-Instruct", dtype=torch.float32)
    assert sae.cfg.site == "L19R" and sae.W_enc.dtype == torch.float32
    x = inputs()
    s = {k: v.float() for k, v in state.items()}
    h = torch.relu(x @ s["encoder_linear.weight"].T + s["encoder_linear.bias"])
    out = h @ s["decoder_linear.weight"].T + s["decoder_linear.bias"]
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.reconstruct(x), out, rtol=1e-5, atol=1e-5)
    # bf16 as released: same function up to bf16 rounding.
    # The published name says layer 19's residual output of Llama-3.1-8B-Instruct: inferred, with a warning.
    with pytest.warns(UserWarning, match="inferred site L19R"):
        native = load_sae(tmp_path)  # a directory with one .pth
    assert native.W_enc.dtype == torch.bfloat16 and native.cfg.site == "L19R"
    assert native.cfg.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert native.cfg.source["inferred_from_file_name"] == ["site", "model_name"]
    # A guess the caller corrects is not a contradiction.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_sae(f, site="L20R").cfg.site == "L20R"
    other = tmp_path / "other"
    other.mkdir()
    torch.save(state, other / "my_sae.pth")
    assert load_sae(other).cfg.site is None
    with pytest.raises(ValueError, match="not a Goodfire SAE"):
        torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
        load_sae(tmp_path / "other.pt")


def test_goodfire_refuses_pickled_code(tmp_path):
    f = tmp_path / "evil.pth"
    torch.save({"encoder_linear.weight": torch.zeros(2, 2), "x": Site(1, "resid_post")}, f)
    with pytest.raises(ValueError, match="weights-only"):
        load_sae(f)


# ----------------------------------------------------------------------------- hook names
@pytest.mark.parametrize("name,site", [
    ("blocks.12.hook_resid_pre", Site(12, "resid_pre")), ("blocks.0.hook_resid_mid", Site(0, "resid_mid")),
    ("blocks.31.hook_resid_post", Site(31, "resid_post")), ("blocks.4.hook_attn_out", Site(4, "attn_out")),
    ("blocks.4.hook_mlp_out", Site(4, "mlp_out")), ("layers.9", Site(9, "resid_post")),
    ("model.layers.9.mlp", Site(9, "mlp_out")), ("layers.2.self_attn", Site(2, "attn_out")),
    ("layers.2.input_layernorm", Site(2, "attn_in")), ("layers.2.post_attention_layernorm", Site(2, "mlp_in")),
])
def test_hook_name_mapping(name, site):
    assert hook_name_to_site(name) == site


def test_hook_names_without_equivalent():
    assert hook_name_to_site("blocks.3.ln1.hook_normalized") == Site(3, "attn_in")  # bound to the model later
    assert hook_name_to_site("blocks.3.hook_mlp_in") == Site(3, "resid_mid")  # TransformerLens: a copy of resid_mid
    for bad in ("blocks.3.attn.hook_z", "hook_embed", "blocks.x.hook_resid_post"):
        with pytest.raises(ValueError, match="no equivalent site"):
            hook_name_to_site(bad)
    assert site_to_hook_name("L7A") == "blocks.7.hook_attn_out"
    with pytest.raises(ValueError, match="no TransformerLens hook"):
        site_to_hook_name("L7AI")


# ----------------------------------------------------------------------------- export to SAELens
def ours(activation="topk", normalization="dataset", **kw):
    k = 5 if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=L, architecture=activation, k=k,
                                      normalization=normalization, site="L4R", model_name="tiny", **kw), seed=1)
    with torch.no_grad():
        sae.W_enc.add_(rand(L, D, seed=21, scale=0.2))
        sae.W_dec.mul_(rand(L, seed=22).abs()[:, None] + 0.5)  # non-unit rows exercise the folding
        sae.b_enc.copy_(rand(L, seed=23, scale=0.1))
        sae.b_pre.copy_(rand(D, seed=24, scale=0.3))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(rand(L, seed=25).abs() * 0.3)
    if normalization == "dataset":
        sae.set_dataset_norm(9.0, 7.0, shift=rand(D, seed=26, scale=0.5))
    return sae


@pytest.mark.parametrize("activation,normalization,kw", [
    ("topk", "dataset", {"rank_by_decoder_norm": True}), ("topk", "none", {}), ("jumprelu", "dataset", {}),
    ("relu", "none", {"apply_b_pre_to_input": False}), ("batchtopk", "none", {}),
    ("topk", "per_token", {"norm_eps": 1e-5}),
])
def test_export_sae_lens_computes_the_same_function(tmp_path, activation, normalization, kw):
    sae = ours(activation, normalization, **kw)
    path = export_sae_lens(sae, tmp_path / "exp")
    cfg = json.loads((path / "cfg.json").read_text())
    from safetensors.torch import load_file

    t = load_file(path / "sae_weights.safetensors")
    assert cfg["metadata"]["hook_name"] == "blocks.4.hook_resid_post" and cfg["d_in"] == D and cfg["d_sae"] == L
    assert t["W_enc"].shape == (D, L) and t["W_dec"].shape == (L, D)
    x = inputs(norm=9.0)
    feats, out = saelens_forward(cfg, t, x)
    with torch.no_grad():
        h = sae.encode(x)
        assert torch.equal(feats > 0, h > 0)
        torch.testing.assert_close(out, sae.reconstruct(x), rtol=2e-5, atol=2e-5)
        back = load_sae(path)
        assert back.cfg.site == "L4R" and back.cfg.model_name == "tiny"
        torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=2e-5, atol=2e-5)


def test_export_needs_a_hook_name(tmp_path):
    sae = ours("topk", "none")
    sae.cfg = sae.cfg.replace(site="L4AI")
    with pytest.raises(ValueError, match="hook_name"):
        export_sae_lens(sae, tmp_path / "a")
    export_sae_lens(sae, tmp_path / "b", hook_name="blocks.4.ln1.hook_normalized")
    assert load_sae(tmp_path / "b").cfg.site == "L4AI"  # our own key restores the exact site
