"""Hook sites, ``(layer, point)``, and their short names ("L15R"): the grammar every stage shares. No torch.

Points, in the order data flows through block ``L``: ``resid_pre`` (block input) -> ``attn_in`` (after
``attention_norm``) -> ``attn_out`` -> ``resid_mid`` -> ``mlp_in`` (after ``ffn_norm``) -> ``mlp_out`` ->
``resid_post`` (block output). ``(L, "mlp")``, short name ``L{L}TC``, is a transcoder's pair: block L's MLP
from its input to its output.
"""

from __future__ import annotations

import re
from typing import NamedTuple

POINTS = ("resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
# The transcoder pseudo-point: an SAE function at (L, "mlp") replaces block L's MLP (mlp_in -> mlp_out).
TRANSCODER = "mlp"
# Llama Scope's short names (R, A, M, TC) plus ours for the other points.
SHORT_NAMES = {
    "R": "resid_post", "A": "attn_out", "M": "mlp_out", "RM": "resid_mid", "RP": "resid_pre",
    "AI": "attn_in", "MI": "mlp_in", "TC": TRANSCODER,
}
SHORT_OF = {v: k for k, v in SHORT_NAMES.items()}
"""point -> its short code ("resid_post" -> "R")."""
_SITE_RE = re.compile(r"^L(\d+)(?:\.([a-z_]+)|([A-Z]+))$")


class Site(NamedTuple):
    layer: int
    point: str

    def __str__(self) -> str:
        return site_name(self)


def parse_site(site: Site | str | int | tuple[int, str]) -> Site:
    """``"L15R"``, ``"L15.resid_post"``, ``15`` (= resid_post) or ``(15, "resid_post")`` -> ``Site(15, "resid_post")``."""
    if isinstance(site, Site):
        layer, point = site
    elif isinstance(site, bool):
        raise ValueError(f"not a hook site: {site!r}")
    elif isinstance(site, int):
        layer, point = site, "resid_post"
    elif isinstance(site, tuple) and len(site) == 2:
        layer, point = site
    elif isinstance(site, str):
        s = site.strip()
        if s.isdigit():
            layer, point = int(s), "resid_post"
        else:
            m = _SITE_RE.match(s)
            if not m:
                raise ValueError(
                    f"cannot parse hook site {site!r}: use L<layer><code> with code one of "
                    f"{sorted(SHORT_NAMES)} (e.g. L15R), or L<layer>.<point> with point one of {POINTS}"
                )
            layer = int(m.group(1))
            point = m.group(2) or SHORT_NAMES.get(m.group(3), "")
            if not point:
                raise ValueError(f"unknown site code {m.group(3)!r} in {site!r}; known codes: {sorted(SHORT_NAMES)}")
    else:
        raise ValueError(f"not a hook site: {site!r}")
    if point not in POINTS and point != TRANSCODER:
        raise ValueError(f"unknown hook point {point!r} in {site!r}; points are {POINTS} (or {TRANSCODER!r})")
    if int(layer) < 0:
        raise ValueError(f"negative layer in hook site {site!r}")
    return Site(int(layer), point)


def site_name(site: Site | str | int | tuple[int, str]) -> str:
    """Canonical short name, e.g. ``Site(15, "resid_post")`` -> ``"L15R"``."""
    layer, point = parse_site(site)
    return f"L{layer}{SHORT_OF[point]}"


def transcoder_site(input_site: Site | str | int | tuple[int, str],
                    output_site: Site | str | int | tuple[int, str]) -> str:
    """The site of a transcoder reading ``input_site`` and predicting ``output_site``: "L{L}TC", which only block
    L's MLP input -> the same block's MLP output can be (a ValueError otherwise)."""
    a, b = parse_site(input_site), parse_site(output_site)
    if a.point != "mlp_in" or b.point != "mlp_out" or a.layer != b.layer:
        raise ValueError(f"a transcoder from {site_name(a)} to {site_name(b)}: only a block's MLP input -> the same "
                         "block's MLP output can replace an MLP here")
    return site_name(Site(a.layer, TRANSCODER))
