"""A checkpoint's weight files, in each layout: which layout a directory holds, where its tokenizer is, and
``load_state_dict`` (Meta's model-parallel shards merged, HF names mapped and rotary rows un-permuted, tied
heads resolved, every missing or misshapen tensor reported at once). ``llama3.checkpoint`` builds the model
from it; GGUF files are ``llama3.gguf``'s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch

from .args import ModelArgs
from .gguf import find_gguf
from .keys import HF_ROTARY_PERMUTED, META_SHARD_DIM, DERIVED_KEYS, key_template, hf_to_meta_name, meta_to_hf_name, unpermute_rotary
from .model import Transformer

Layout = Literal["meta", "hf", "gguf"]

# --------------------------------------------------------------------------- files
_META_EXPECTED = "params.json + consolidated.00.pth [.. consolidated.NN.pth] (+ tokenizer.model)"
_HF_EXPECTED = ("config.json + model.safetensors, or model-0000i-of-0000n.safetensors with "
                "model.safetensors.index.json (+ original/tokenizer.model)")


def _listing(ckpt_dir: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in ckpt_dir.iterdir())
    if not names:
        return "the directory is empty"
    shown = ", ".join(names[:30]) + (f", ... ({len(names) - 30} more)" if len(names) > 30 else "")
    return f"found: {shown}"


def _meta_shards(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("consolidated.*.pth"))


def detect_layout(ckpt_dir: str | Path) -> Layout:
    """``"meta"`` (params.json + consolidated.*.pth), ``"hf"`` (config.json + *.safetensors) or ``"gguf"``
    (a .gguf file, or a directory holding exactly one and neither of the other layouts).

    Raises FileNotFoundError naming what each layout needs and what the directory holds."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file():
        if find_gguf(ckpt_dir) is not None:
            return "gguf"
        raise FileNotFoundError(f"{ckpt_dir} is a file but not a .gguf checkpoint; pass a GGUF file or a checkpoint "
                                f"directory (Meta: {_META_EXPECTED}; HF: {_HF_EXPECTED})")
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {ckpt_dir} does not exist")
    has_params, has_config = (ckpt_dir / "params.json").is_file(), (ckpt_dir / "config.json").is_file()
    if has_params and _meta_shards(ckpt_dir):
        return "meta"
    if has_config and (_hf_index(ckpt_dir) or (ckpt_dir / "model.safetensors").is_file()):
        return "hf"
    if find_gguf(ckpt_dir) is not None:
        return "gguf"
    if has_params:
        problem = "it has params.json but no consolidated.*.pth weights (Meta layout)"
    elif has_config:
        problem = "it has config.json but no model.safetensors / model.safetensors.index.json (HF layout)"
        if list(ckpt_dir.glob("*.bin")):
            problem += "; PyTorch *.bin weights are not read: convert them to safetensors"
    elif _meta_shards(ckpt_dir):
        problem = "it has consolidated.*.pth weights but no params.json (Meta layout)"
    elif list(ckpt_dir.glob("*.safetensors")):
        problem = "it has *.safetensors weights but no config.json (HF layout)"
    else:
        problem = "it holds neither layout"
    hint = ""
    if (ckpt_dir / "original" / "params.json").is_file():
        hint = f"; {ckpt_dir / 'original'} looks like a Meta checkpoint: pass that directory instead"
    raise FileNotFoundError(
        f"{ckpt_dir} is not a Llama checkpoint: {problem}. Expected the Meta layout ({_META_EXPECTED}), "
        f"the HF layout ({_HF_EXPECTED}) or one .gguf file; {_listing(ckpt_dir)}{hint}"
    )


def _hf_index(ckpt_dir: Path) -> Path | None:
    path = ckpt_dir / "model.safetensors.index.json"
    return path if path.is_file() else None


def find_tokenizer(ckpt_dir: str | Path) -> Path:
    """The tiktoken ``tokenizer.model`` of a checkpoint: ``tokenizer.model`` or ``original/tokenizer.model``."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / "tokenizer.model", ckpt_dir / "original" / "tokenizer.model"]
    for path in candidates:
        if path.is_file():
            return path
    extra = ""
    listing = _listing(ckpt_dir) if ckpt_dir.is_dir() else "the directory does not exist"
    raise FileNotFoundError(
        f"no Llama 3 tokenizer in {ckpt_dir}: looked for {', '.join(str(p) for p in candidates)}{extra}; "
        f"{listing}. Copy the checkpoint's tokenizer.model there."
    )


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    # .to() returns the tensor itself when nothing changes: mapped pages then become the parameter.
    return t.to(device=device, dtype=dtype or t.dtype)


def _read_meta(ckpt_dir: Path) -> tuple[dict[str, list[torch.Tensor]], list[Path]]:
    """{meta name: [tensor of each shard]} with every shard memory-mapped (nothing read yet)."""
    paths = _meta_shards(ckpt_dir)
    # consolidated.00 .. consolidated.NN must all be there: a missing rank would merge to wrong shapes.
    want = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if [p.name for p in paths] != want:
        raise FileNotFoundError(
            f"{ckpt_dir}: model-parallel shards must be consolidated.00.pth .. consolidated.{len(paths) - 1:02d}.pth "
            f"without gaps; found {[p.name for p in paths]}"
        )
    shards = []
    for path in paths:
        try:
            shards.append(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # a truncated download or a non-zip file: say which file
            raise ValueError(f"cannot read {path}: {e}") from e
    keys = list(shards[0])
    for path, sd in zip(paths[1:], shards[1:]):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise ValueError(f"{path.name} and {paths[0].name} hold different tensor names, e.g. {diff[:5]}")
    return {k: [sd[k] for sd in shards] for k in keys if not DERIVED_KEYS.match(k)}, paths


def _read_hf(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """{HF name: tensor}, each safetensors file memory-mapped (safe_open returns views of the map)."""
    from safetensors import safe_open

    index = _hf_index(ckpt_dir)
    if index is not None:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index.name} lists weight files that are not in {ckpt_dir}: {missing}; "
                                    f"{_listing(ckpt_dir)}. Re-download the missing shards.")
    else:
        weight_map, files = {}, ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(ckpt_dir / name), framework="pt", device="cpu") as f:
            for key in f.keys():
                if index is not None and weight_map.get(key) != name:
                    continue  # listed under another file (or not at all): the index decides
                out[key] = f.get_tensor(key)
    absent = sorted(k for k in weight_map if k not in out)
    if absent:
        raise ValueError(f"{index} maps tensors to files that do not hold them: {absent[:10]}")
    return out


def _merge_dim(name: str, pieces: list[torch.Tensor], full: torch.Size) -> int | None:
    """Dim to concatenate Meta shards on (None: replicated); shape problems are left to the caller."""
    template, _ = key_template(name)
    dim = META_SHARD_DIM.get(template, None)
    if dim == "by_shape":
        n, shape = len(pieces), tuple(pieces[0].shape)
        if len(shape) == 2 and shape[0] * n == full[0] and shape[1] == full[1]:
            return 0
        if len(shape) == 2 and shape[0] == full[0] and shape[1] * n == full[1]:
            return 1
        return 0
    return dim


def _merged_shape(pieces: list[torch.Tensor], dim: int | None) -> tuple[int, ...]:
    shape = list(pieces[0].shape)
    if dim is not None and len(pieces) > 1:
        shape[dim] = sum(p.shape[dim] for p in pieces)
    return tuple(shape)


def _dedupe_repeated_kv(name: str, pieces: list[torch.Tensor], n_kv_heads: int) -> list[torch.Tensor]:
    """With more model-parallel ranks than kv heads (e.g. Llama 3.1 405B MP16 with 8 kv heads), each kv
    head of wk/wv sits on ``n_ranks // n_kv_heads`` consecutive ranks; keep one copy of each."""
    n = len(pieces)
    if not name.endswith(("attention.wk.weight", "attention.wv.weight")) or n <= n_kv_heads or n % n_kv_heads:
        return pieces
    rep = n // n_kv_heads
    kept = pieces[::rep]
    for i, p in enumerate(pieces):
        if not torch.equal(p, kept[i // rep]):
            raise ValueError(f"{name}: shards {i // rep * rep} and {i} should hold the same kv head "
                             f"({n} shards, {n_kv_heads} kv heads) but differ")
    return kept


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())


def load_state_dict(ckpt_dir: str | Path, params: ModelArgs, *, layout: Layout | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.bfloat16
                    ) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """Read a checkpoint into ``{meta name: tensor}`` on ``device`` in ``dtype`` (None: as stored).

    Returns the state dict and ``params`` with ``tie_word_embeddings`` resolved from the checkpoint:
    a missing output head (HF Llama 3.2 omits ``lm_head.weight``; Meta files may omit ``output.weight``)
    or one stored as the embedding's own storage means a tied head, and the returned dict then holds the
    embedding under both names. Missing/unexpected names and wrong shapes raise one ValueError that lists
    them all."""
    ckpt_dir = Path(ckpt_dir)
    layout = layout or detect_layout(ckpt_dir)
    device = torch.device(device)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(params).state_dict().items()}
    pieces, src_names, unknown, where, config_name = _stored_pieces(ckpt_dir, layout)
    tie = _tied_head(ckpt_dir, layout, params.tie_word_embeddings, pieces, src_names, config_name)
    params = dataclasses.replace(params, tie_word_embeddings=tie)
    if tie:
        expected.pop("output.weight", None)
    merge_dims = _check_pieces(ckpt_dir, layout, params, pieces, src_names, unknown, expected, where, config_name)
    sd = _convert_pieces(pieces, merge_dims, expected, layout, params, dtype, device)
    if tie:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd, params


def _stored_pieces(ckpt_dir: Path, layout: Layout):
    """The stored tensors under Meta names, still lazily mapped: ({name: [pieces]}, {name: stored name},
    stored names with no Meta name, a description of the files, the config file's name)."""
    if layout == "meta":
        pieces, paths = _read_meta(ckpt_dir)
        where = paths[0].name if len(paths) == 1 else f"{paths[0].name} .. {paths[-1].name}"
        return pieces, {k: k for k in pieces}, [], where, "params.json"
    pieces, src_names, unknown = {}, {}, []
    for hf_name, t in _read_hf(ckpt_dir).items():
        if DERIVED_KEYS.match(hf_name):
            continue
        name = hf_to_meta_name(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        pieces[name], src_names[name] = [t], hf_name
    return pieces, src_names, unknown, "the safetensors files", "config.json"


def _tied_head(ckpt_dir: Path, layout: Layout, tie: bool, pieces: dict, src_names: dict, config_name: str) -> bool:
    """Whether the output head is the embedding: absent, or stored as the embedding itself. A tied head's
    own copy is dropped from ``pieces``."""
    out_p, emb_p = pieces.get("output.weight"), pieces.get("tok_embeddings.weight")
    if out_p is None and emb_p is not None:
        if layout == "hf" and not tie:
            raise ValueError(f"{ckpt_dir}: config.json has tie_word_embeddings=false but the checkpoint has no "
                             f"lm_head.weight; set tie_word_embeddings to true if the head is the embedding")
        return True
    if out_p is not None and emb_p is not None:
        if all(_shares_storage(o, e) for o, e in zip(out_p, emb_p)):
            tie = True
        elif tie and not all(torch.equal(o, e) for o, e in zip(out_p, emb_p)):
            raise ValueError(f"{ckpt_dir}: {config_name} ties the output head to the embedding, but the checkpoint's "
                             f"{src_names['output.weight']} differs from {src_names['tok_embeddings.weight']}; "
                             f"set tie_word_embeddings to false to use the separate head")
        if tie:
            del pieces["output.weight"]
    return tie


def _check_pieces(ckpt_dir: Path, layout: Layout, params: ModelArgs, pieces: dict, src_names: dict,
                  unknown: list[str], expected: dict, where: str, config_name: str) -> dict[str, int | None]:
    """Names and shapes against the config, every problem reported at once; returns the dimension along
    which each sharded tensor's pieces concatenate (None: replicated)."""
    problems = []
    missing = [k for k in expected if k not in pieces]
    unexpected = unknown + [src_names[k] for k in pieces if k not in expected]
    if missing:
        shown = [meta_to_hf_name(k) if layout == "hf" else k for k in missing]
        problems.append(f"missing tensors: {_clip(shown)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_clip(unexpected)}")
    merge_dims: dict[str, int | None] = {}
    for name, ps in pieces.items():
        if name not in expected:
            continue
        want = tuple(expected[name])
        if len(ps) > 1:
            ps = pieces[name] = _dedupe_repeated_kv(name, ps, params.n_kv_heads)
            merge_dims[name] = _merge_dim(name, ps, expected[name])
            if merge_dims[name] is None:
                for i, p in enumerate(ps[1:], 1):
                    if p.shape != ps[0].shape or not torch.equal(p, ps[0]):
                        problems.append(f"{name} is replicated over model-parallel shards but shard {i} "
                                        f"differs from shard 0")
                        break
        got = _merged_shape(ps, merge_dims.get(name))
        if got != want:
            merged = f" (merged from {len(ps)} shards)" if len(ps) > 1 else ""
            problems.append(f"shape mismatch for {src_names[name]}: the checkpoint has {got}{merged}, "
                            f"{config_name} implies {want}")
    if problems:
        raise ValueError(f"checkpoint {ckpt_dir} ({where}) does not match its {config_name}:\n  - "
                         + "\n  - ".join(problems)
                         + f"\nCheck that {config_name} belongs to these weights and that no file is missing "
                           f"or truncated.")
    return merge_dims


def _convert_pieces(pieces: dict, merge_dims: dict[str, int | None], expected: dict, layout: Layout,
                    params: ModelArgs, dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Convert tensor by tensor (merging shards straight into the output), so one copy at most is made."""
    sd: dict[str, torch.Tensor] = {}
    for name in list(pieces):
        ps = pieces.pop(name)  # drop our reference to the mapped pieces as we go
        dim = merge_dims.get(name)
        if len(ps) == 1 or dim is None:
            t = _convert(ps[0], dtype, device)
        else:
            t = torch.empty(expected[name], dtype=dtype or ps[0].dtype, device=device)
            offset = 0
            for p in ps:
                t.narrow(dim, offset, p.shape[dim]).copy_(p)
                offset += p.shape[dim]
        if layout == "hf":
            template, _ = key_template(name)
            if template in HF_ROTARY_PERMUTED:
                t = unpermute_rotary(t, getattr(params, HF_ROTARY_PERMUTED[template]))
        sd[name] = t
    return sd


def _clip(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# --------------------------------------------------------------------------- the model
