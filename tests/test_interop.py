"""``load_sae`` against the real libraries: each test builds random SAEs with the library's own classes (every
parameter perturbed, uneven decoder norms, thresholds at the activations' scale), saves them with the
library's own save function, and compares what the library computes with what ``load_sae`` computes on the
same inputs: identical active sets, ``decode(encode(x))`` within 1e-4 relative.

The libraries are the ``interop`` extra (sae-lens, eai-sparsify, llamascopium); without them these tests skip.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_random_model, tiny_args
from sae import SAEConfig, SparseAutoencoder, bind_to_model, detect_format, export_sae_lens, load_sae

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning:llamascopium.*",
                                        "ignore::UserWarning:torch.*")

D, N = 16, 40


def randn(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs(n=64, seed=7, norm=12.0):
    """Tokens with a residual-stream-like mean and average norm."""
    x = randn(n, D, seed=seed) + randn(D, seed=seed + 1, scale=0.7)
    return x / x.norm(dim=1).mean() * norm


@torch.no_grad()
def perturb(module, seed=0, scale=0.3, skip=()):
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if any(s in name for s in skip):
            continue
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def uneven_decoder_(W: torch.Tensor, seed: int, dim: int) -> None:
    """Scale each latent's decoder vector by a factor in [0.4, 2.4] (dim: the latent axis)."""
    f = randn(W.shape[dim], seed=seed).abs().clamp(max=2.0) + 0.4
    W.mul_(f[:, None] if dim == 0 else f[None, :])


def assert_same(ours_codes, lib_codes, ours_rec, lib_rec, *, atol=1e-5):
    ours_codes, lib_codes = ours_codes.float(), lib_codes.float()
    assert torch.equal(ours_codes > 0, lib_codes > 0), (
        f"active sets differ in {int(((ours_codes > 0) != (lib_codes > 0)).sum())} places")
    fired = (lib_codes > 0).sum(-1).float().mean()
    assert 0 < fired < N, f"degenerate test: mean L0 {fired}"
    torch.testing.assert_close(ours_codes, lib_codes, rtol=1e-4, atol=atol)
    rel = ((ours_rec.float() - lib_rec.float()).norm(dim=-1) / lib_rec.float().norm(dim=-1)).max()
    assert rel < 1e-4, f"reconstructions differ by {float(rel):.2e} relative"


# ============================================================================ SAELens
sae_lens = pytest.importorskip("sae_lens", reason="the interop extra (pip install -e '.[interop]')")
from sae_lens.saes.sae import SAEMetadata  # noqa: E402


def _saelens_sae(arch: str, normalize: str, *, hook="blocks.3.hook_resid_post", seed=0, **kw):
    md = SAEMetadata(hook_name=hook, model_name="tiny-llama", prepend_bos=True, **kw.pop("metadata", {}))
    common = dict(d_in=D, d_sae=N, normalize_activations=normalize, metadata=md)
    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 6}),
        "topk_rescale": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 6, "rescale_acts_by_decoder_norm": True}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {}),
        "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig, {"d_out": D, "apply_b_dec_to_input": False}),
        "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig,
                            {"d_out": D, "apply_b_dec_to_input": False}),
        "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig,
                                {"d_out": D, "apply_b_dec_to_input": False}),
        "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig,
                                     {"d_out": D, "apply_b_dec_to_input": False}),
    }
    cls, cfg_cls, extra = classes[arch]
    sae = cls(cfg_cls(**common, **extra, **kw))
    perturb(sae, seed=seed, skip=("threshold",))
    with torch.no_grad():
        uneven_decoder_(sae.W_dec, seed + 1, dim=0)
        if hasattr(sae, "threshold"):
            # At the scale of the pre-activations: about half of the positive ones pass; a few are negative.
            x = inputs(seed=seed + 5)
            xin = sae.run_time_activation_norm_fn_in(x) if hasattr(sae, "run_time_activation_norm_fn_in") else x
            pre = xin @ sae.W_enc + sae.b_enc
            t = pre.clamp_min(0).median(0).values + randn(N, seed=seed + 2, scale=0.05)
            sae.threshold.copy_(t)
            sae.threshold[:3] = -0.2
    return sae


def _saelens_outputs(sae, x, transcoder: bool):
    with torch.no_grad():
        f = sae.encode(x)
        rec = sae(x) if transcoder else sae.decode(f)
    return f, rec


SAELENS_CASES = [
    ("standard", "none"), ("topk", "none"), ("topk_rescale", "none"), ("jumprelu", "none"), ("gated", "none"),
    ("topk", "constant_norm_rescale"), ("gated", "constant_norm_rescale"), ("jumprelu", "layer_norm"),
    ("standard", "layer_norm"),
]


@pytest.mark.parametrize("arch,normalize", SAELENS_CASES)
def test_sae_lens_saes_compute_as_sae_lens(tmp_path, arch, normalize):
    lib = _saelens_sae(arch, normalize, seed=len(arch) + len(normalize))
    lib.save_model(tmp_path / "sae")
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    x = inputs()
    f, rec = _saelens_outputs(loaded, x, transcoder=False)
    ours = load_sae(tmp_path / "sae")
    assert detect_format(tmp_path / "sae") == "sae_lens"
    assert ours.cfg.site == "L3R" and ours.cfg.model_name == "tiny-llama" and ours.cfg.prepend_bos is True
    with torch.no_grad():
        atol = 1e-4 if normalize == "layer_norm" else 1e-5
        assert_same(ours.encode(x), f, ours.reconstruct(x), rec, atol=atol)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_sae_lens_transcoders_compute_as_sae_lens(tmp_path, arch):
    lib = _saelens_sae(arch, "none", hook="blocks.1.ln2.hook_normalized", seed=len(arch),
                       metadata={"hook_name_out": "blocks.1.hook_mlp_out"})
    lib.save_model(tmp_path / "tc")
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"))
    x_tl = inputs() / 3  # TransformerLens's ln2.hook_normalized: the normalised input before the RMSNorm weight
    f, y = _saelens_outputs(loaded, x_tl, transcoder=True)
    ours = load_sae(tmp_path / "tc")
    assert ours.cfg.site == "L1TC" and ours.cfg.is_transcoder
    assert ours.cfg.skip_connection == ("skip" in arch)
    # Our mlp_in is after the norm weight g: bind the SAE to a model, which divides its input columns by g.
    model = make_random_model(tiny_args(dim=D, n_heads=2, n_kv_heads=1, multiple_of=16))
    with torch.no_grad():
        model.layers[1].ffn_norm.weight.copy_(randn(D, seed=3).abs() + 0.5)
    with pytest.raises(ValueError, match="bind_to_model"):
        from sae import check_injection

        check_injection(ours, model.params)
    bind_to_model(ours, model)
    mlp_in = x_tl * model.layers[1].ffn_norm.weight.detach()
    with torch.no_grad():
        assert_same(ours.encode(mlp_in), f, ours.reconstruct(mlp_in), y)


def test_our_export_is_read_by_sae_lens_with_the_same_numbers_and_names(tmp_path):
    cases = [
        dict(architecture="topk", k=5, normalization="dataset", rank_by_decoder_norm=True),
        dict(architecture="jumprelu", k=None, normalization="none"),
        dict(architecture="relu", k=None, normalization="per_token_rms", apply_b_pre_to_input=False),
    ]
    for i, kw in enumerate(cases):
        sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=N, site="L4R", model_name="tiny-llama",
                                          prepend_bos=True, **kw), seed=i)
        perturb(sae, seed=10 + i, scale=0.25)
        with torch.no_grad():
            uneven_decoder_(sae.W_dec, 20 + i, dim=0)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(randn(N, seed=30 + i).abs() * 0.3)
        if kw["normalization"] == "dataset":
            sae.set_dataset_norm(11.0, 8.0, shift=randn(D, seed=40, scale=0.5))
        out = export_sae_lens(sae, tmp_path / f"e{i}")
        lib = sae_lens.SAE.load_from_disk(str(out))
        assert lib.cfg.metadata.hook_name == "blocks.4.hook_resid_post"
        assert lib.cfg.metadata.model_name == "tiny-llama" and lib.cfg.metadata.prepend_bos is True
        x = inputs()
        f, rec = _saelens_outputs(lib, x, transcoder=False)
        with torch.no_grad():
            # SAELens reports decoder-norm-ranked codes times ||W_dec[i]||: our scale="decoder_norm".
            scale = "decoder_norm" if kw.get("rank_by_decoder_norm") else "native"
            assert_same(sae.encode(x, scale=scale), f, sae.reconstruct(x), rec)
            back = load_sae(out)
            assert back.cfg.site == "L4R"
            assert_same(back.encode(x), f, back.reconstruct(x), rec)


@pytest.mark.parametrize("skip", [False, True])
def test_our_transcoder_export_is_a_sae_lens_transcoder(tmp_path, skip):
    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=N, architecture="jumprelu", k=None, site="L2TC",
                                      normalization="dataset", apply_b_pre_to_input=False, skip_connection=skip,
                                      model_name="tiny-llama"), seed=2)
    perturb(sae, seed=12, scale=0.25)
    with torch.no_grad():
        uneven_decoder_(sae.W_dec, 22, dim=0)
        sae.threshold.copy_(randn(N, seed=32).abs() * 0.2)
    sae.set_dataset_norm(11.0, 4.0)
    with pytest.raises(ValueError, match="hook_name_out"):
        export_sae_lens(sae, tmp_path / "x")
    out = export_sae_lens(sae, tmp_path / "tc", hook_name="blocks.2.hook_mlp_in_after_norm",
                          hook_name_out="blocks.2.hook_mlp_out")
    lib = sae_lens.SAE.load_from_disk(str(out))
    assert type(lib).__name__ == ("JumpReLUSkipTranscoder" if skip else "JumpReLUTranscoder")
    assert lib.cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"
    x = inputs(norm=11.0)
    f, y = _saelens_outputs(lib, x, transcoder=True)
    with torch.no_grad():
        assert_same(sae.encode(x), f, sae.reconstruct(x), y)
        back = load_sae(out)
        assert back.cfg.site == "L2TC" and "input_before_norm_weight" not in back.cfg.source
        assert_same(back.encode(x), f, back.reconstruct(x), y)


# ============================================================================ sparsify
sparsify = pytest.importorskip("sparsify", reason="the interop extra (pip install -e '.[interop]')")


@pytest.mark.parametrize("transcode,skip", [(False, False), (False, True), (True, False), (True, True)])
def test_sparsify_coders_compute_as_sparsify(tmp_path, transcode, skip):
    cfg = sparsify.SparseCoderConfig(activation="topk", num_latents=N, k=6, transcode=transcode, skip_connection=skip)
    coder = sparsify.SparseCoder(D, cfg, device="cpu", dtype=torch.float32)
    perturb(coder, seed=3 + 2 * transcode + skip, scale=0.3)
    with torch.no_grad():
        uneven_decoder_(coder.W_dec, 5, dim=0)
    hookpoint = "layers.2.mlp" if transcode else "layers.2"
    coder.save_to_disk(tmp_path / hookpoint)
    lib = sparsify.SparseCoder.load_from_disk(tmp_path / hookpoint)
    x = inputs()
    with torch.no_grad():
        enc = lib.encode(x)
        f = torch.zeros(x.shape[0], N).scatter(-1, enc.top_indices, enc.top_acts)
        rec = lib(x).sae_out  # decode + the skip term
    ours = load_sae(tmp_path / hookpoint)
    assert ours.cfg.site == ("L2TC" if transcode else "L2R") and ours.cfg.skip_connection == skip
    with torch.no_grad():
        assert_same(ours.encode(x), f, ours.reconstruct(x), rec)


# ============================================================================ llamascopium (Llama Scope 2.x)
llamascopium = pytest.importorskip("llamascopium", reason="the interop extra (pip install -e '.[interop]')")


def _llamascopium_sae(tmp_path, act_fn, norm, include_dn, *, hook_in="blocks.2.hook_resid_post", hook_out=None,
                      seed=0):
    from llamascopium.models.sae import SAEConfig as LSConfig, SparseAutoEncoder as LSSae

    hook_out = hook_out or hook_in
    cfg = LSConfig(d_model=D, expansion_factor=N / D, hook_point_in=hook_in, hook_point_out=hook_out, act_fn=act_fn,
                   top_k=6, norm_activation=norm, sparsity_include_decoder_norm=include_dn, dtype=torch.float32,
                   device="cpu")
    sae = LSSae(cfg)
    perturb(sae, seed=seed, scale=0.3, skip=("log_jumprelu_threshold",))
    with torch.no_grad():
        uneven_decoder_(sae.W_D, seed + 1, dim=0)
    norms = {hook_in: 14.0, hook_out: 5.0} if hook_in != hook_out else {hook_in: 14.0}
    sae.set_dataset_average_activation_norm(norms)
    x = inputs(seed=seed + 9, norm=14.0)
    if act_fn == "jumprelu":  # thresholds where about half of the positive codes pass
        with torch.no_grad():
            batch = sae.normalize_activations({hook_in: x}) if norm != "inference" else {hook_in: x}
            pre = batch[hook_in] @ sae.W_E + sae.b_E
            g = pre * (sae.W_D.norm(dim=1) if include_dn else 1)
            # (off the data: a threshold equal to a token's value would test rounding, not the math)
            theta = (g.clamp_min(0).median(0).values + randn(N, seed=seed + 2, scale=0.05)).clamp_min(1e-3)
            sae.activation_function.log_jumprelu_threshold.copy_(theta.log())
    path = tmp_path / f"ls-{act_fn}-{norm}-{include_dn}"
    sae.save_pretrained(str(path))
    sae.cfg.save_hyperparameters(str(path))
    return path, x


def _llamascopium_reference(path, x, hook_in, hook_out):
    from llamascopium.models.sparse_dictionary import SparseDictionary

    lib = SparseDictionary.from_pretrained(str(path))
    with torch.no_grad():
        batch, s = lib.normalize_activations({hook_in: x, hook_out: x}, return_scale_factor=True)
        f = lib.encode(batch[hook_in])
        rec = lib.decode(f) / s[hook_out]
    return f, rec


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("include_dn", [True, False])
def test_llamascopium_saes_compute_as_llamascopium(tmp_path, act_fn, include_dn):
    hook = "blocks.2.hook_resid_post"
    path, x = _llamascopium_sae(tmp_path, act_fn, "dataset-wise", include_dn, seed=3 + include_dn)
    f, rec = _llamascopium_reference(path, x, hook, hook)
    assert detect_format(path) == "llamascopium"
    ours = load_sae(path)
    assert ours.cfg.site == "L2R" and ours.cfg.normalization == "dataset"
    with torch.no_grad():
        assert_same(ours.encode(x), f, ours.reconstruct(x), rec)


@pytest.mark.parametrize("norm", ["token-wise", "inference"])
def test_llamascopium_other_normalisations(tmp_path, norm):
    hook = "blocks.2.hook_mlp_out"
    path, x = _llamascopium_sae(tmp_path, "topk", norm, True, hook_in=hook, seed=11)
    f, rec = _llamascopium_reference(path, x, hook, hook)
    ours = load_sae(path)
    assert ours.cfg.site == "L2M"
    with torch.no_grad():
        assert_same(ours.encode(x), f, ours.reconstruct(x), rec)


def test_llamascopium_transcoder(tmp_path):
    hook_in, hook_out = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    path, x_tl = _llamascopium_sae(tmp_path, "jumprelu", "dataset-wise", True, hook_in=hook_in, hook_out=hook_out,
                                   seed=21)
    from llamascopium.models.sparse_dictionary import SparseDictionary

    lib = SparseDictionary.from_pretrained(str(path))
    with torch.no_grad():
        s_in = math.sqrt(D) / 14.0
        s_out = math.sqrt(D) / 5.0
        f = lib.encode(x_tl * s_in)
        y = lib.decode(f) / s_out
    ours = load_sae(path)
    assert ours.cfg.site == "L1TC"
    model = make_random_model(tiny_args(dim=D, n_heads=2, n_kv_heads=1, multiple_of=16))
    with torch.no_grad():
        model.layers[1].ffn_norm.weight.copy_(randn(D, seed=4).abs() + 0.5)
    bind_to_model(ours, model)
    mlp_in = x_tl * model.layers[1].ffn_norm.weight.detach()
    with torch.no_grad():
        assert_same(ours.encode(mlp_in), f, ours.reconstruct(mlp_in), y)


def test_llamascopium_batchtopk_is_refused_with_the_reason(tmp_path):
    path, _ = _llamascopium_sae(tmp_path, "batchtopk", "dataset-wise", True, seed=1)
    with pytest.raises(ValueError, match="whole batch"):
        load_sae(path)
