"""Seeded generators of activations with planted ground truth.

Four suites, each a function registered by name:

* ``independent``: GBA's model. ``n`` unit directions in ``R^d``, each feature
  fires on its own with probability ``f_i`` (flat, geometric or Zipf spectrum)
  or, in the ``gba`` preset, every sample has exactly 3 or 20 active features.
* ``hierarchical``: a tree of features; a child fires only when its parent
  fires and siblings exclude each other. Preset ``A`` is the MP-SAE toy tree,
  preset ``B`` a deeper tree whose children lean on their parents' directions.
* ``bidirectional``: signed axes (one direction, both signs) plus unipolar
  features, AbsTopK's setting.
* ``multimodal``: two modalities with one set of shared concepts plus
  private concepts, in one space (``shared``) or two (``separate``).

Every generator draws its dictionary once from the seed and then two
independent sample sets (train and test). ``noise`` adds ``sigma * xi`` with
``xi ~ N(0, I/d)`` to the activations (not to the codes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vlsae.errors import VlsaeError
from vlsae.registry import Registry

Tensorish = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class PlantedData:
    """Activations with the code and dictionary that made them.

    train, test: (n, d) tensors, or modality -> (n, d_m) for the multimodal suite
    (rows of the modalities are paired: row i of "image" and of "text" share a code).
    codes_train, codes_test: (n, n_features) ground-truth codes (signed for
    bidirectional axes), or modality -> (n, n_features_m).
    directions: (n_features, d) unit ground-truth directions, or modality -> (n_features_m, d_m).
    meta: what the suite knows beyond that (hierarchy, signs, shared/private features, ...).
    """

    suite: str
    train: Tensorish
    test: Tensorish
    codes_train: Tensorish
    codes_test: Tensorish
    directions: Tensorish
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.train) if isinstance(self.train, dict) else ()

    @property
    def d_in(self) -> int | dict[str, int]:
        if isinstance(self.train, dict):
            return {m: x.shape[1] for m, x in self.train.items()}
        return self.train.shape[1]


# ------------------------------------------------------------------ registry
SUITES: Registry[Callable[..., PlantedData]] = Registry("synthetic suite", name_attr="suite_name")


def _suite(name: str, presets: tuple[str, ...]) -> Callable:
    """Register a generator under ``name`` with its presets (the first is the default)."""
    return SUITES.register(name, presets=presets)


def list_suites() -> list[str]:
    """Names of the planted-feature suites, sorted."""
    return SUITES.names()


def list_presets(suite: str) -> tuple[str, ...]:
    """The presets of one suite; the first is its default."""
    return SUITES.get(suite).presets  # type: ignore[attr-defined]


def generate(suite: str, *, seed: int = 0, n_train: int = 50_000, n_test: int = 10_000,
             preset: str | None = None, noise: float = 0.0, **options: Any) -> PlantedData:
    """Draw a planted-feature data set.

    suite: one of :func:`list_suites`; preset: one of :func:`list_presets` (None = default);
    noise: standard deviation sigma of the added noise ``sigma * N(0, I/d)``;
    options: suite-specific settings (see each generator's docstring); unknown ones are errors.
    """
    generator = SUITES.get(suite)
    presets = list_presets(suite)
    preset = presets[0] if preset is None else str(preset)
    if preset not in presets:
        raise VlsaeError(f"unknown preset '{preset}' for suite '{suite}'; choose one of: {', '.join(presets)}")
    if n_train < 1 or n_test < 1:
        raise VlsaeError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    if noise < 0:
        raise VlsaeError(f"noise must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(int(seed))
    try:
        data = generator(gen, n_train=n_train, n_test=n_test, preset=preset, noise=float(noise), **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            bad = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
            raise VlsaeError(f"suite '{suite}' has no option '{bad}'") from None
        raise
    data.meta.update(suite=suite, preset=preset, seed=int(seed), noise=float(noise))
    return data


# ------------------------------------------------------------------- helpers
def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _random_directions(gen: torch.Generator, n: int, d: int) -> torch.Tensor:
    """(n, d) rows i.i.d. N(0, I/d), normalised."""
    return _unit_rows(torch.randn(n, d, generator=gen))


def _orthonormal(gen: torch.Generator, n: int, d: int) -> torch.Tensor:
    """(n, d) orthonormal rows (n <= d) from the QR of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(d, n, generator=gen))
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.t().contiguous()


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=gen)


def _add_noise(gen: torch.Generator, x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return x
    return x + sigma * torch.randn(x.shape, generator=gen) / math.sqrt(x.shape[1])


def _check_range(name: str, value: float, low: float, high: float, *, closed_high: bool = True) -> None:
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise VlsaeError(f"option '{name}' must be in [{low}, {high}{bracket}, got {value}")


# ----------------------------------------------------- (i) independent features
def _frequencies(spectrum: str, n: int, expected_l0: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) firing probabilities and (n,) band index (0 = most frequent)."""
    if spectrum == "flat":
        s = 5.0 if expected_l0 is None else expected_l0
        return torch.full((n,), s / n), torch.zeros(n, dtype=torch.long)
    if spectrum == "geometric":
        levels = torch.logspace(-1, -4, 10, dtype=torch.float64).float()
        band = torch.arange(n) * 10 // n
        freq = levels[band]
        if expected_l0 is not None:
            freq = (freq * expected_l0 / freq.sum()).clamp(max=1.0)
        return freq, band
    if spectrum == "zipf":
        freq = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
        s = 8.0 if expected_l0 is None else expected_l0
        freq = (freq * s / freq.sum()).clamp(max=1.0).float()
        band = (torch.arange(n) * 10 // n)
        return freq, band
    raise VlsaeError(f"unknown spectrum '{spectrum}'; choose flat, geometric or zipf")


@_suite("independent", presets=("light", "heavy", "gba"))
def _independent(gen: torch.Generator, *, n_train: int, n_test: int, preset: str, noise: float,
                 spectrum: str = "flat", n_features: int | None = None, d: int | None = None,
                 expected_l0: float | None = None) -> PlantedData:
    """Independent sparse features, ``x = h V``, magnitudes U[0.5, 1.5].

    presets: light (n=512, d=64), heavy (n=1024, d=24), gba (n=128, d=42, half the
    samples with exactly 3 active features, half with 20).
    options: spectrum flat (f = 5/n) | geometric (10 bands from 0.1 to 1e-4) | zipf
    (f_i proportional to 1/i, E[L0] = 8); n_features, d override the preset's sizes;
    expected_l0 rescales the spectrum (not for gba).
    """
    sizes = {"light": (512, 64), "heavy": (1024, 24), "gba": (128, 42)}[preset]
    n = int(n_features or sizes[0])
    dim = int(d or sizes[1])
    if n < 1 or dim < 1:
        raise VlsaeError(f"n_features and d must be positive, got {n} and {dim}")
    directions = _random_directions(gen, n, dim)
    meta: dict[str, Any] = {"n_features": n, "d": dim}
    if preset == "gba":
        if spectrum != "flat" or expected_l0 is not None:
            raise VlsaeError("the gba preset fixes its own support (3 or 20 active features); drop spectrum/expected_l0")
        s_choices = (3, 20)
        if n < max(s_choices):
            raise VlsaeError(f"the gba preset needs n_features >= 20, got {n}")
        freq = torch.full((n,), sum(s_choices) / 2 / n)
        band = torch.zeros(n, dtype=torch.long)
        meta.update(spectrum="gba", support_sizes=list(s_choices))

        def support(m: int) -> torch.Tensor:
            s = torch.where(torch.rand(m, generator=gen) < 0.5, s_choices[0], s_choices[1])
            ranks = torch.rand(m, n, generator=gen).argsort(dim=1).argsort(dim=1)
            return ranks < s[:, None]
    else:
        freq, band = _frequencies(spectrum, n, expected_l0)
        meta.update(spectrum=spectrum)

        def support(m: int) -> torch.Tensor:
            return torch.rand(m, n, generator=gen) < freq

    meta.update(frequencies=freq, band=band)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = support(m)
        codes = mask * _uniform(gen, (m, n), 0.5, 1.5)
        return _add_noise(gen, codes @ directions, noise), codes

    x_tr, z_tr = draw(n_train)
    x_te, z_te = draw(n_test)
    return PlantedData("independent", x_tr, x_te, z_tr, z_te, directions, meta)


# ----------------------------------------------------- (ii) hierarchical features
@dataclass
class Tree:
    """A feature hierarchy. Node i has ``parent[i]`` (-1 for the top level),
    ``level[i]`` (0 = top) and ``prob[i]``, its firing probability given that its
    parent fires. Siblings in a group listed in ``exclusive`` fire at most one at a
    time (their probabilities are the categorical weights; the rest is "none")."""

    parent: list[int]
    level: list[int]
    prob: list[float]
    exclusive_top: bool = True
    exclusive_children: bool = True

    @property
    def n(self) -> int:
        return len(self.parent)

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parent) if p == node]

    def groups(self) -> list[list[int]]:
        """Sibling groups: the top level, then each parent's children."""
        out = [self.children(-1)]
        out += [self.children(i) for i in range(self.n) if self.children(i)]
        return out

    def is_exclusive(self, group: list[int]) -> bool:
        return self.exclusive_top if self.parent[group[0]] == -1 else self.exclusive_children

    def expected_l0(self) -> float:
        marginal = [0.0] * self.n
        for i in sorted(range(self.n), key=lambda j: self.level[j]):
            p = self.parent[i]
            marginal[i] = self.prob[i] * (1.0 if p == -1 else marginal[p])
        return float(sum(marginal))

    def sample(self, gen: torch.Generator, m: int) -> torch.Tensor:
        """(m, n) bool: which features fire in each of m samples."""
        active = torch.zeros(m, self.n, dtype=torch.bool)
        for group in sorted(self.groups(), key=lambda g: self.level[g[0]]):
            p = self.parent[group[0]]
            gate = torch.ones(m, dtype=torch.bool) if p == -1 else active[:, p]
            probs = torch.tensor([self.prob[i] for i in group])
            if self.is_exclusive(group):
                weights = torch.cat([probs, (1 - probs.sum()).clamp_min(0).reshape(1)])
                pick = torch.multinomial(weights, m, replacement=True, generator=gen)
                for slot, node in enumerate(group):
                    active[:, node] = gate & (pick == slot)
            else:
                fire = torch.rand(m, len(group), generator=gen) < probs
                active[:, group] = fire & gate[:, None]
        return active


def mp_sae_tree() -> Tree:
    """The MP-SAE toy tree (Costa et al. B.1): 11 mutually exclusive top-level
    features (8 leaves at p=0.05, 3 parents at p=0.2), each parent with 3 mutually
    exclusive children at p=0.2 given the parent. 20 features, L0 in {1, 2},
    expected L0 = 1.36."""
    parent, level, prob = [], [], []
    for _ in range(8):
        parent.append(-1), level.append(0), prob.append(0.05)
    for _ in range(3):
        parent.append(-1), level.append(0), prob.append(0.2)
    for p in range(8, 11):
        for _ in range(3):
            parent.append(p), level.append(1), prob.append(0.2)
    return Tree(parent, level, prob)


def deep_tree(depth: int = 3, branching: int = 4, child_prob: float = 0.2) -> Tree:
    """A full tree: ``branching`` top-level features (exclusive, equally likely, one
    always fires), each with ``branching`` exclusive children at ``child_prob`` given
    the parent, down to ``depth`` levels."""
    parent, level, prob = [], [], []
    frontier = []
    for _ in range(branching):
        frontier.append(len(parent))
        parent.append(-1), level.append(0), prob.append(1.0 / branching)
    for lev in range(1, depth):
        nxt = []
        for p in frontier:
            for _ in range(branching):
                nxt.append(len(parent))
                parent.append(p), level.append(lev), prob.append(child_prob)
        frontier = nxt
    return Tree(parent, level, prob)


def _sibling_epsilon(group_size: int, target: float) -> float:
    """epsilon such that normalise(e_i + eps * sum_{j != i} e_j) has pairwise cosine
    ``target`` within a group of orthonormal vectors (bisection on [0, 1])."""
    m = group_size
    if target == 0 or m < 2:
        return 0.0

    def cos(eps: float) -> float:
        return (2 * eps + (m - 2) * eps ** 2) / (1 + (m - 1) * eps ** 2)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cos(mid) < target else (lo, mid)
    return (lo + hi) / 2


def offset_directions(directions: torch.Tensor, parent: list[int]) -> torch.Tensor:
    """(n, d): each child's direction minus its projection on its parent's, normalised
    (top-level features keep theirs). Because a child only fires with its parent,
    the dictionary {parent, offset} explains the data with the same supports as
    {parent, child}; SAEs often learn the offsets, so they are scored as well."""
    out = directions.clone()
    for i, p in enumerate(parent):
        if p >= 0:
            vp = directions[p]
            r = directions[i] - (directions[i] @ vp) * vp
            out[i] = r / r.norm().clamp_min(1e-12)
    return out


@_suite("hierarchical", presets=("A", "B"))
def _hierarchical(gen: torch.Generator, *, n_train: int, n_test: int, preset: str, noise: float,
                  correlation: float = 0.0, depth: int = 3, branching: int = 4, d: int | None = None,
                  child_weight: float = 1.0) -> PlantedData:
    """Features on a tree: a child fires only with its parent, siblings are exclusive;
    magnitudes N(1.5, 0.25^2) truncated at 0, independent between parent and child.

    preset A: the MP-SAE toy (20 orthonormal directions in R^20, expected L0 1.36);
    option ``correlation`` in [0, 1) sets the cosine between siblings (each atom gets
    eps times the sum of its siblings' atoms, then is renormalised; applied to every
    sibling group, the top level included).
    preset B: ``depth`` levels of ``branching`` (default 3 and 4: 4 + 16 + 64 = 84
    features, 85 nodes counting the implicit root), d = 128; top-level directions are
    random, a child is ``normalise(v_parent + child_weight * u)`` with ``u`` a random
    unit vector orthogonal to ``v_parent`` (Park et al.: child - parent is orthogonal
    to parent); ``correlation`` does not apply.
    meta["offset_directions"] holds each child's offset from its parent
    (:func:`offset_directions`); in preset A they equal the directions.
    """
    if preset == "A":
        tree = mp_sae_tree()
        dim = int(d or 20)
        if dim < tree.n:
            raise VlsaeError(f"preset A needs d >= 20 for orthogonal directions, got {dim}")
        _check_range("correlation", float(correlation), 0.0, 1.0, closed_high=False)
        base = _orthonormal(gen, tree.n, dim)
        directions = base.clone()
        for group in tree.groups():
            eps = _sibling_epsilon(len(group), float(correlation))
            if eps:
                block = base[group]
                directions[group] = block + eps * (block.sum(0, keepdim=True) - block)
        directions = _unit_rows(directions)
    else:
        if correlation:
            raise VlsaeError("option 'correlation' is for preset A; preset B sets child-parent geometry with child_weight")
        if depth < 1 or branching < 1:
            raise VlsaeError(f"depth and branching must be positive, got {depth} and {branching}")
        tree = deep_tree(int(depth), int(branching))
        dim = int(d or 128)
        directions = torch.empty(tree.n, dim)
        for i in range(tree.n):
            if tree.parent[i] == -1:
                directions[i] = _random_directions(gen, 1, dim)[0]
            else:
                vp = directions[tree.parent[i]]
                u = torch.randn(dim, generator=gen)
                u = u - (u @ vp) * vp
                u = u / u.norm()
                v = vp + float(child_weight) * u
                directions[i] = v / v.norm()

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tree.sample(gen, m)
        mags = (1.5 + 0.25 * torch.randn(m, tree.n, generator=gen)).clamp_min(1e-3)
        codes = mask * mags
        return _add_noise(gen, codes @ directions, noise), codes

    x_tr, z_tr = draw(n_train)
    x_te, z_te = draw(n_test)
    meta = {
        "n_features": tree.n, "d": dim,
        "parent": torch.tensor(tree.parent), "level": torch.tensor(tree.level),
        "prob": torch.tensor(tree.prob), "groups": tree.groups(),
        "expected_l0": tree.expected_l0(), "correlation": float(correlation),
        "offset_directions": offset_directions(directions, tree.parent),
    }
    return PlantedData("hierarchical", x_tr, x_te, z_tr, z_te, directions, meta)


# ---------------------------------------------------- (iii) bidirectional features
@_suite("bidirectional", presets=("default",))
def _bidirectional(gen: torch.Generator, *, n_train: int, n_test: int, preset: str, noise: float,
                   d: int = 64, n_axes: int = 128, n_unipolar: int = 128, expected_l0: float = 6.0,
                   p_plus: float = 0.5) -> PlantedData:
    """Signed axes plus unipolar features; every item fires independently with
    probability expected_l0 / (n_axes + n_unipolar). An axis gets coefficient
    sign * m with sign = +1 with probability ``p_plus``; a unipolar feature +m;
    m ~ U[0.5, 1.5]. Features 0..n_axes-1 are the axes (meta["is_axis"]); their
    codes are signed.
    """
    _check_range("p_plus", float(p_plus), 0.0, 1.0)
    n = int(n_axes) + int(n_unipolar)
    if n_axes < 0 or n_unipolar < 0 or n < 1 or d < 1:
        raise VlsaeError("n_axes, n_unipolar must be >= 0 with at least one feature, and d positive")
    _check_range("expected_l0", float(expected_l0), 0.0, float(n))
    directions = _random_directions(gen, n, int(d))
    is_axis = torch.arange(n) < n_axes
    freq = float(expected_l0) / n

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.rand(m, n, generator=gen) < freq
        mags = _uniform(gen, (m, n), 0.5, 1.5)
        signs = torch.where(torch.rand(m, n, generator=gen) < p_plus, 1.0, -1.0)
        signs = torch.where(is_axis, signs, torch.ones(()))
        codes = mask * mags * signs
        return _add_noise(gen, codes @ directions, noise), codes

    x_tr, z_tr = draw(n_train)
    x_te, z_te = draw(n_test)
    meta = {"n_features": n, "d": int(d), "n_axes": int(n_axes), "n_unipolar": int(n_unipolar),
            "is_axis": is_axis, "p_plus": float(p_plus), "expected_l0": float(expected_l0)}
    return PlantedData("bidirectional", x_tr, x_te, z_tr, z_te, directions, meta)


# ------------------------------------------------------- (iv) two modalities
@_suite("multimodal", presets=("shared", "separate"))
def _multimodal(gen: torch.Generator, *, n_train: int, n_test: int, preset: str, noise: float,
                n_shared: int = 96, n_image_only: int = 32, n_text_only: int = 32, rho: float = 0.9,
                offset: float = 2.0, d: int = 64, d_image: int = 64, d_text: int = 48, eta: float = 0.3,
                shared_l0: float = 5.0, private_l0: float = 1.0, mention_prob: float = 0.8,
                jitter: float = 0.2) -> PlantedData:
    """Paired image/text activations sharing one concept code.

    Features of modality m: the ``n_shared`` shared concepts first (same index in
    both modalities), then that modality's private concepts.
    preset shared: one space of width ``d``; the text direction of a concept has
    cosine ``rho`` with its image direction; modality offsets mu_I, mu_T with
    ||mu_I - mu_T|| = ``offset``.
    preset separate: image width ``d_image``, text width ``d_text``; text direction
    = normalise(Q u_image[:d_text] + eta * zeta), Q a random orthogonal map.
    A pair draws shared concepts with E[L0] = ``shared_l0`` (magnitudes U[0.5, 1.5]);
    the caption mentions each with probability ``mention_prob``, its magnitude scaled
    by exp(N(0, jitter^2)); each side adds private concepts with E[L0] = ``private_l0``.
    """
    _check_range("rho", float(rho), -1.0, 1.0)
    _check_range("mention_prob", float(mention_prob), 0.0, 1.0)
    if min(n_shared, n_image_only, n_text_only) < 0 or n_shared < 1:
        raise VlsaeError("need n_shared >= 1 and non-negative private counts")
    c, ci, ct = int(n_shared), int(n_image_only), int(n_text_only)
    if preset == "shared":
        d_i = d_t = int(d)
        u_img = _random_directions(gen, c, d_i)
        w = torch.randn(c, d_i, generator=gen)
        w = _unit_rows(w - (w * u_img).sum(1, keepdim=True) * u_img)
        u_txt = float(rho) * u_img + math.sqrt(max(1 - float(rho) ** 2, 0.0)) * w
        e = _random_directions(gen, 1, d_i)[0]
        offsets = {"image": e * float(offset) / 2, "text": -e * float(offset) / 2}
    else:
        d_i, d_t = int(d_image), int(d_text)
        if d_t > d_i:
            raise VlsaeError(f"the separate preset needs d_text <= d_image, got {d_t} > {d_i}")
        u_img = _random_directions(gen, c, d_i)
        q = _orthonormal(gen, d_t, d_t)
        zeta = _random_directions(gen, c, d_t)
        u_txt = _unit_rows(u_img[:, :d_t] @ q.t() + float(eta) * zeta)
        offsets = {"image": torch.zeros(d_i), "text": torch.zeros(d_t)}
    directions = {
        "image": torch.cat([u_img, _random_directions(gen, ci, d_i)]),
        "text": torch.cat([u_txt, _random_directions(gen, ct, d_t)]),
    }
    n_private = {"image": ci, "text": ct}

    def draw(m: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        shared = (torch.rand(m, c, generator=gen) < shared_l0 / c) * _uniform(gen, (m, c), 0.5, 1.5)
        mentioned = torch.rand(m, c, generator=gen) < mention_prob
        jit = torch.exp(float(jitter) * torch.randn(m, c, generator=gen))
        shared_by = {"image": shared, "text": shared * mentioned * jit}
        xs, zs = {}, {}
        for mod in ("image", "text"):
            k = n_private[mod]
            priv = torch.zeros(m, k)
            if k:
                priv = (torch.rand(m, k, generator=gen) < min(private_l0 / k, 1.0)) * _uniform(gen, (m, k), 0.5, 1.5)
            z = torch.cat([shared_by[mod], priv], dim=1)
            x = z @ directions[mod] + offsets[mod]
            xs[mod], zs[mod] = _add_noise(gen, x, noise), z
        return xs, zs

    x_tr, z_tr = draw(n_train)
    x_te, z_te = draw(n_test)
    meta = {"n_shared": c, "n_private": n_private, "setting": preset, "rho": float(rho) if preset == "shared" else None,
            "offsets": offsets, "mention_prob": float(mention_prob),
            "n_features": {m: v.shape[0] for m, v in directions.items()}}
    return PlantedData("multimodal", x_tr, x_te, z_tr, z_te, directions, meta)
