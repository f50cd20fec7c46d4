"""Top-activating examples for every latent of an SAE (``llama3-sae top-examples``).

The original project credited each sentence only to its single strongest latent, so ~90% of latents
never got an example. Here every (document, latent) pair competes for that latent's lists.

Two streaming passes over the text source (``capture``'s reader, tokeniser and length-bucketed batches):

1. **Scan.** Model + SAE over every document. For each group of documents the SAE code is reduced on the
   device to dense [documents, latents] tables: max over tokens, mean over tokens, value at the last
   token. These are merged into per-latent running top-N tables ([latents, N] values and document ids:
   concatenate, ``topk``), so memory is bounded by N and the group size, not by the data. The same
   merge keeps, per latent, a uniform random sample (a *reservoir*) of the documents it fired on: each
   (document, latent) pair gets a fixed pseudo-random key from a hash, and the largest keys are kept,
   which is order-independent, so a resumed run selects exactly what an uninterrupted one would. A
   global reservoir of random documents is kept the same way. Per-latent counts (documents and tokens
   fired on, max, sum) come along.
2. **Detail.** The documents selected above (a small fraction) are read again and recomputed, this time
   keeping each selected latent's per-token activations, and choosing for each latent random documents
   from the global reservoir on which it never fires (for detection scoring).

Selection per latent: top-N by max, mean and last; the reservoir split into activation quantile bins
(equal counts, weakest first) with a few documents per bin for the labelling prompt and a few more held
out for scoring (never documents already in a top list or shown in a bin).

Each document's first position (a leading BOS, or without BOS the first token) is never credited unless
the SAE was trained on first-token rows: it is an attention sink whose activations are outliers. Its
token still appears in the stored text.

Resumable: the state (all tables, documents done, detail parts written) is saved atomically to
``SAE_DIR/top_examples.work/`` every ``--checkpoint-every-s`` seconds at the end of a window; rerunning
the same command continues from there. Output formats: see ``interpret.records``.
"""

from __future__ import annotations

import codecs
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from capture.batching import collate, encode_window, plan_batches
from capture.sources import count_records, document_windows, iter_documents, resolve_files, skip_documents
from llama3.chat_template import chat_format_for
from llama3.checkpoint import check_vocab, load_model, load_tokenizer, resolve_checkpoint
from llama3_sae.config import identity_differences, save_config, to_jsonable
from llama3_sae.devices import DTYPES, resolve_device
from llama3_sae.files import atomic_path, atomic_write_json
from llama3_sae.sites import site_name
from sae import bind_to_model, load_sae
from sae.config import input_site_of, resolve_bos

from .config import TopExamplesConfig
from .records import (AGGREGATIONS, EXAMPLES_FILE, EXAMPLES_FORMAT, EXAMPLES_META, EXAMPLES_VERSION, DocExample,
                      LatentExamples)
from .scan import (SALT_POOL, SALT_RANDOM, SALT_RESERVOIR, Aggregator, ScanState, Selection, Tables, WorkDir,
                   doc_groups, hash_keys, merge_top, select)

WORK = "top_examples.work"


# ---------------------------------------------------------------------- documents
@dataclass
class _Loaded:
    model: Any
    sae: Any
    tokenizer: Any
    chat_format: Any
    site: str
    device: torch.device
    bos: bool = False
    skip_first: bool = True

    @property
    def key(self) -> str:
        """The activation the SAE encodes (a transcoder's MLP input)."""

        return input_site_of(self.site)


def load_everything(cfg: TopExamplesConfig, console: Any = None) -> _Loaded:

    device = resolve_device(cfg.device)
    sae = load_sae(cfg.sae, site=cfg.site, device=device)
    if sae.cfg.site is None:
        raise ValueError(f"{cfg.sae}: the SAE's config names no hook site; pass --site (e.g. --site L8R)")
    site = site_name(sae.cfg.site)
    ckpt = resolve_checkpoint(cfg.ckpt_dir)
    tokenizer = load_tokenizer(ckpt, cfg.tokenizer)
    model = load_model(ckpt, device=device, dtype=DTYPES[cfg.model_dtype], store_layer_activ=[site])
    check_vocab(model.params, tokenizer.n_words, where=ckpt, exact=None, tokenizer=tokenizer)
    bos, note = resolve_bos(cfg.bos, sae.cfg, tokenizer)
    if note and console is not None:
        console.print(note)
    if model.params.dim != sae.cfg.d_model:
        raise ValueError(f"the SAE reads d_model={sae.cfg.d_model} but the model in {ckpt} has dim="
                         f"{model.params.dim}: this SAE belongs to another model ({sae.cfg.model_name or 'unnamed'})")
    if cfg.max_tokens > model.max_seq_len:
        raise ValueError(f"--max-tokens {cfg.max_tokens} exceeds the model's max_seq_len {model.max_seq_len}")

    bind_to_model(sae, model)  # SAEs trained on TransformerLens's normalised inputs take the model's norm weight
    sae.eval()
    return _Loaded(model, sae, tokenizer, chat_format_for(tokenizer), site, device, bos=bos,
                   skip_first=sae.cfg.first_token_excluded is not False)


def _windows(cfg: TopExamplesConfig, skip: int) -> Iterator[list[Any]]:
    """Windows of ``window_docs`` documents from document ``skip`` on (a window boundary)."""

    docs = skip_documents(iter_documents(cfg), skip, "Rerun with --overwrite to start over.")
    yield from document_windows(docs, cfg.window_docs)


def _batches(window: list[Any], cfg: TopExamplesConfig, lo: _Loaded, counters: dict[str, int]):
    """Tokenised, length-bucketed, right-padded batches of a window: (tokens [B, T], keep [B, T] credited
    positions, doc ids [B], ids per row)."""

    enc = encode_window(window, lo.tokenizer, lo.chat_format, bos=lo.bos, max_tokens=cfg.max_tokens,
                        counters=counters)
    if not enc:
        return
    for idx in plan_batches([len(e.ids) for e in enc], cfg.tokens_per_batch):
        docs = [enc[i] for i in idx]
        skip_first = [lo.skip_first] * len(docs)
        batch = collate(docs, pad_id=0, skip_first=skip_first)
        yield batch.tokens, batch.keep, torch.tensor([e.doc_id for e in docs], dtype=torch.int64), docs


# ---------------------------------------------------------------------- the run
def run_top_examples(cfg: TopExamplesConfig, *, console: Any = None) -> Path:
    """Run (or resume) both passes and write the output files; returns the path of top_examples.jsonl."""

    console = console or Console(stderr=True)
    out_dir = cfg.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a directory: the examples are written into a directory; "
                         "pass --out DIR (and later `llama3-sae interpret --sae DIR`)")
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / EXAMPLES_FILE
    work = WorkDir(out_dir / WORK)
    meta_path = out_dir / EXAMPLES_META
    if cfg.overwrite:
        shutil.rmtree(work.path, ignore_errors=True)
    ident = cfg.identity()
    if not cfg.overwrite and meta_path.exists() and final.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("complete"):
            # Finished work reruns as a no-op, as capture's and train's do; other options need --overwrite.
            done = meta.get("identity")
            if done is None or done == ident:
                console.print(f"top examples already complete: {final}")
                return final
            raise ValueError(f"{final} was computed with other options ({identity_differences(done, ident)}); pass "
                             "--overwrite to compute it again with these")
    state = work.load()
    if state is not None and state.identity != ident:
        diff = identity_differences(state.identity, ident)
        raise ValueError(f"{work.path} holds an interrupted run made with other options ({diff}); rerun "
                         "it with the same options to finish it, or pass --overwrite to start over")
    lo = load_everything(cfg, console)
    L = lo.sae.cfg.n_latents
    tables = Tables(L, cfg, lo.device)
    if state is None:
        state = ScanState(ident)
        work.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, work.path / "config.json")
    else:
        work.load_tables(state, tables)
        work.remove_uncommitted(state)
        console.print(f"resuming top-examples: {state.phase} pass, {state.docs_done:,} documents scanned")
    agg = Aggregator(lo.sae, L, cfg.memory_mb)
    with torch.inference_mode():
        if state.phase == "scan":
            _scan(cfg, lo, agg, tables, work, state, console)
            state.phase = "detail"
            work.save(state, tables)
        selection = select(tables.cpu(), cfg)
        if state.phase == "detail":
            _detail(cfg, lo, agg, tables, selection, work, state, console)
            state.phase = "write"
            work.save(state, tables)
    _write_output(cfg, lo, tables.cpu(), selection, work, state, console)
    shutil.rmtree(work.path, ignore_errors=True)
    return final


def _progress(cfg: TopExamplesConfig, console: Any, what: str, unit: str = "docs"):

    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    disable=not cfg.progress)


def _total_docs(cfg: TopExamplesConfig) -> int | None:

    total = cfg.limit
    if not cfg.split_sentences:
        n = count_records(resolve_files(cfg.data, cfg.format))
        total = n if total is None else (min(total, n) if n is not None else total)
    return total


def _scan(cfg: TopExamplesConfig, lo: _Loaded, agg: Aggregator, tables: Tables, work: WorkDir,
          state: ScanState, console: Any) -> None:
    t = tables.t
    L = agg.L
    latents = torch.arange(L, device=lo.device)
    counters: dict[str, int] = dict(state.counters)
    last_save = time.monotonic()
    t0, tokens_run = time.monotonic(), 0
    with _progress(cfg, console, "top-examples: scan") as bar:
        task = bar.add_task("scan", total=_total_docs(cfg), completed=state.docs_done, rate="")
        for window in _windows(cfg, state.docs_done):
            for tokens, keep, doc_ids, _ in _batches(window, cfg, lo, counters):
                acts = lo.model.forward_activations(tokens.to(lo.device))[lo.key]  # [B, T, d]
                keep = keep.to(lo.device)
                doc_ids = doc_ids.to(lo.device)
                for g0, g1, x, tok_doc, _, tok_last in doc_groups(acts, keep, agg.docs_per_group):
                    G = g1 - g0
                    ids = doc_ids[g0:g1]
                    n_credit = keep[g0:g1].sum(1)
                    dmax, dsum, dlast, active = agg.reduce(x, tok_doc, tok_last, G)
                    dmean = dsum / n_credit.clamp_min(1)[:, None]
                    fired = dmax > 0  # [G, L]
                    t["active_docs"] += fired.sum(0)
                    t["active_tokens"] += active
                    t["max"] = torch.maximum(t["max"], dmax.amax(0))
                    t["sum"] += dsum.sum(0, dtype=torch.float64)
                    ninf = torch.tensor(-torch.inf, device=lo.device)
                    for name, table in (("max", dmax), ("mean", dmean), ("last", dlast)):
                        cand = torch.where(table > 0, table, ninf).T  # [L, G]
                        t[f"top_{name}_val"], t[f"top_{name}_doc"] = merge_top(
                            t[f"top_{name}_val"], t[f"top_{name}_doc"], cand, ids[None, :])
                    keys = torch.where(fired, hash_keys(ids, latents, cfg.sample_seed, SALT_RESERVOIR), -1).T
                    t["res_key"], t["res_doc"], t["res_val"] = merge_top(
                        t["res_key"], t["res_doc"], keys, ids[None, :], extra=(t["res_val"], dmax.T))
                    if cfg.random_pool > 0:
                        # Only documents with a credited token: an all-BOS document says nothing.
                        pk = torch.where(n_credit > 0, hash_keys(ids, None, cfg.sample_seed, SALT_POOL), -1)
                        t["pool_key"], t["pool_doc"] = merge_top(t["pool_key"], t["pool_doc"], pk, ids)
                    counters["tokens"] = counters.get("tokens", 0) + int(n_credit.sum())
                    tokens_run += int(n_credit.sum())
            state.docs_done += len(window)
            counters["docs"] = state.docs_done
            state.counters = counters
            rate = tokens_run / max(time.monotonic() - t0, 1e-9)
            bar.update(task, completed=state.docs_done, rate=f"{rate:,.0f} tok/s")
            if time.monotonic() - last_save >= cfg.checkpoint_every_s:
                work.save(state, tables)
                last_save = time.monotonic()
    if not state.docs_done:
        raise ValueError(f"no documents in --data {', '.join(map(str, cfg.data))}")


def _detail(cfg: TopExamplesConfig, lo: _Loaded, agg: Aggregator, tables: Tables, sel: Selection, work: WorkDir,
            state: ScanState, console: Any) -> None:
    t = tables.t
    L = agg.L
    pairs = sel.pairs()  # [n, 2] (doc, latent), sorted
    pair_docs = np.unique(pairs[:, 0]) if len(pairs) else np.zeros(0, np.int64)
    pool = np.array(sel.pool, dtype=np.int64)
    wanted = np.union1d(pair_docs, pool)
    latents = torch.arange(L, device=lo.device)
    buf: dict[str, list[np.ndarray]] = {k: [] for k in ("doc", "latent", "pos", "value",
                                                        "tok_doc", "tok_len", "tok_ids")}
    counters: dict[str, int] = {}
    last_save = time.monotonic()

    def flush() -> None:
        if buf["tok_doc"]:
            arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in buf.items()}
            arrays["value"] = arrays["value"].astype(np.float32)
            state.parts.append(work.write_part(len(state.parts) + 1, arrays))
            for v in buf.values():
                v.clear()
        work.save(state, tables)

    with _progress(cfg, console, "top-examples: detail") as bar:
        task = bar.add_task("detail", total=state.docs_done, completed=state.detail_docs_done, rate="")
        for window in _windows(cfg, state.detail_docs_done):
            ids_w = np.array([d.doc_id for d in window], dtype=np.int64)
            chosen = [d for d, keep in zip(window, np.isin(ids_w, wanted)) if keep]
            for tokens, keep, doc_ids, docs in _batches(chosen, cfg, lo, counters):
                acts = lo.model.forward_activations(tokens.to(lo.device))[lo.key]
                keep = keep.to(lo.device)
                for g0, g1, x, tok_doc, tok_pos, _ in doc_groups(acts, keep, agg.docs_per_group):
                    G = g1 - g0
                    gdocs = doc_ids[g0:g1].numpy()
                    # need[g, latent]: this document's per-token activations are wanted for this latent.
                    need = torch.zeros(G * L, dtype=torch.bool)
                    lo_i, hi_i = np.searchsorted(pairs[:, 0], gdocs), np.searchsorted(pairs[:, 0], gdocs, "right")
                    for g in range(G):
                        lat = pairs[lo_i[g]:hi_i[g], 1]
                        need[g * L + torch.from_numpy(lat)] = True
                    need = need.view(G, L).to(lo.device)
                    dmax = x.new_zeros(G * L, dtype=torch.float32)
                    for r0, vals, idx in agg.codes(x):
                        r = vals.shape[0]
                        td = tok_doc[r0:r0 + r, None].expand_as(idx)
                        on = vals > 0
                        dmax.scatter_reduce_(0, (td * L + idx)[on], vals[on], reduce="amax")
                        hit = on & need[td, idx]
                        if bool(hit.any()):
                            buf["doc"].append(doc_ids[g0:g1].to(lo.device)[td[hit]].cpu().numpy())
                            buf["latent"].append(idx[hit].cpu().numpy())
                            buf["pos"].append(tok_pos[r0:r0 + r, None].expand_as(idx)[hit].cpu().numpy())
                            buf["value"].append(vals[hit].cpu().numpy())
                    # Random non-activating documents: pool documents on which the latent is 0 everywhere.
                    in_pool = torch.from_numpy(np.isin(gdocs, pool)).to(lo.device)
                    if cfg.random_examples > 0 and bool(in_pool.any()):
                        gid = doc_ids[g0:g1].to(lo.device)
                        quiet = (dmax.view(G, L) == 0) & in_pool[:, None]
                        keys = torch.where(quiet, hash_keys(gid, latents, cfg.sample_seed, SALT_RANDOM), -1).T
                        t["rand_key"], t["rand_doc"] = merge_top(t["rand_key"], t["rand_doc"], keys, gid[None, :])
                # Tokens of every recomputed document (activating ones and the random pool) for the output.
                buf["tok_doc"].append(np.array([e.doc_id for e in docs], dtype=np.int64))
                buf["tok_len"].append(np.array([len(e.ids) for e in docs], dtype=np.int64))
                buf["tok_ids"].append(np.array([i for e in docs for i in e.ids], dtype=np.int64))
            state.detail_docs_done += len(window)
            bar.update(task, completed=state.detail_docs_done)
            if time.monotonic() - last_save >= cfg.checkpoint_every_s:
                flush()
                last_save = time.monotonic()
    flush()


# ---------------------------------------------------------------------- output
class _Pieces:
    """Token ids -> text pieces whose concatenation is the exact decoded text (a character split over
    several tokens goes to the token that completes it)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, bytes] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = []
        for i in ids:
            b = self.cache.get(i)
            if b is None:
                b = self.cache[i] = self.tokenizer.decode_bytes([i])
            out.append(dec.decode(b))
        tail = dec.decode(b"", final=True)
        if tail and out:
            out[-1] += tail
        return out


def _write_output(cfg: TopExamplesConfig, lo: _Loaded, tables: dict[str, torch.Tensor], sel: Selection,
                  work: WorkDir, state: ScanState, console: Any) -> None:
    L = tables["max"].shape[0]
    parts = [work.read_part(p) for p in state.parts]
    cat = lambda k, dt: np.concatenate([p[k] for p in parts]).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    doc, lat, pos, val = cat("doc", np.int64), cat("latent", np.int64), cat("pos", np.int64), cat("value", np.float32)
    order = np.lexsort((pos, doc, lat))
    doc, lat, pos, val = doc[order], lat[order], pos[order], val[order]
    starts = np.searchsorted(lat, np.arange(L + 1))
    tok_docs, tok_lens, tok_flat = cat("tok_doc", np.int64), cat("tok_len", np.int64), cat("tok_ids", np.int64)
    offsets = np.concatenate([[0], np.cumsum(tok_lens)])
    doc_tokens = {int(d): (int(offsets[i]), int(offsets[i + 1])) for i, d in enumerate(tok_docs)}
    rand_doc, rand_key = tables["rand_doc"].tolist(), tables["rand_key"].tolist()
    pieces = _Pieces(lo.tokenizer)
    counters = state.counters
    n_docs, n_tokens = int(counters.get("docs", 0)), int(counters.get("tokens", 0))
    a_docs, a_toks = tables["active_docs"].tolist(), tables["active_tokens"].tolist()
    mx, sm = tables["max"].tolist(), tables["sum"].tolist()
    with atomic_path(cfg.out_dir / EXAMPLES_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f, \
            _progress(cfg, console, "top-examples: write", "latents") as bar:
        task = bar.add_task("write", total=L, rate="")
        for latent in range(L):
            bar.advance(task)
            s, e = starts[latent], starts[latent + 1]
            acts: dict[int, list[tuple[int, float]]] = {}
            for d, p, v in zip(doc[s:e].tolist(), pos[s:e].tolist(), val[s:e].tolist()):
                acts.setdefault(d, []).append((p, v))
            # A latent that never fired gets no random documents: there is nothing to score them against.
            random_docs = [d for d, k in zip(rand_doc[latent], rand_key[latent]) if k >= 0 and a_docs[latent] > 0]
            random_docs = random_docs[: cfg.random_examples]
            rec = LatentExamples(
                latent=latent,
                stats={"docs": n_docs, "tokens": n_tokens, "active_docs": a_docs[latent],
                       "active_tokens": a_toks[latent], "max": mx[latent], "sum": sm[latent]},
                top={a: sel.top[a][latent] for a in AGGREGATIONS}, quantiles=sel.quantiles[latent],
                score_active=sel.score_active[latent], score_random=random_docs)
            shown = {d for a in AGGREGATIONS for d, _ in rec.top[a]}
            shown |= {d for q in rec.quantiles for d, _ in q["examples"]}
            shown |= {d for d, _ in rec.score_active} | set(random_docs)
            for d in sorted(shown):
                if d not in doc_tokens:
                    raise RuntimeError(f"internal error: document {d} of latent {latent} was not recomputed")
                a, b = doc_tokens[d]
                rec.docs[d] = DocExample(d, pieces(tok_flat[a:b].tolist()), acts.get(d, []))
            f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")

    meta = {"format": EXAMPLES_FORMAT, "version": EXAMPLES_VERSION, "complete": True, "config": to_jsonable(cfg),
            "identity": cfg.identity(), "sae": str(cfg.sae.resolve()), "site": lo.site, "model": lo.sae.cfg.model_name,
            "n_latents": L, "docs": n_docs, "tokens": n_tokens, "aggregations": list(AGGREGATIONS),
            "counters": counters, "dead_latents": int(sum(1 for x in a_docs if x == 0))}
    atomic_write_json(cfg.out_dir / EXAMPLES_META, meta)
    cut = (f"; {counters['truncated_docs']:,} documents cut to --max-tokens {cfg.max_tokens} "
           f"({counters.get('truncated_tokens', 0):,} tokens left out)" if counters.get("truncated_docs") else "")
    empty = f"; {counters['empty_docs']:,} empty documents skipped" if counters.get("empty_docs") else ""
    console.print(f"top examples of {L:,} latents over {n_docs:,} documents ({n_tokens:,} tokens) -> "
                  f"{cfg.out_dir / EXAMPLES_FILE}; {meta['dead_latents']:,} latents never fired{cut}{empty}")
