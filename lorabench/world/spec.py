"""The mini world's vocabulary: object classes, attributes, identities (novel concepts) and styles.

Everything is a pure function of the world seed. Identities and styles are split into an
*experiment* pool (the concepts and styles the papers' protocols personalise) and an *evaluator*
pool (what the world's metric models are trained on), which never overlap, as real metric models
never saw the subjects they score.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from lorabench.errors import choice_error

CLASSES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (220, 45, 45), "green": (45, 175, 70), "blue": (50, 90, 225), "yellow": (235, 210, 45),
           "purple": (150, 60, 200), "orange": (245, 140, 30)}
SIZES = {"small": 0.28, "large": 0.42}  # half-extent as a fraction of the image side
POSITIONS = {"left": (0.32, 0.5), "right": (0.68, 0.5), "top": (0.5, 0.32), "bottom": (0.5, 0.68),
             "center": (0.5, 0.5)}
BACKGROUNDS = {"white": (238, 238, 238), "black": (22, 22, 22), "gray": (128, 128, 128)}
PATTERNS = ("hstripes", "vstripes", "checker", "dot", "ring", "split", "diagonal", "border")
# Rare tokens: in the vocabulary, never in pretraining captions (the papers' DreamBooth tokens first).
RARE_TOKENS = ("sks", "zwz", "sbu", "uwu", "pdw", "twt", "zsn", "ofl", "psq", "cws", "vlx", "qiq", "bnk",
               "hpf", "jyv", "xod", "mrw", "gatz", "kib", "yum", "dov", "fep", "nix", "ruk")
# Style components and the invented style words (never in pretraining captions).
PALETTES = ("natural", "sepia", "neon", "pastel", "inverted", "mono", "warm", "cold")
TEXTURES = ("flat", "scanlines", "grain", "dots", "weave")
OUTLINES = ("none", "dark", "light")
STYLE_WORDS = ("vango", "monex", "kandi", "hokus", "picaz", "klimo", "dalio", "rothk", "mucha", "seura",
               "matis", "escha", "turnr", "hoppa", "warho", "lempi", "magri", "okeef", "bosch", "goyah")
CAPTION = "a {size} {colour} {cls} at {position} on {background}"
CONCEPT_PROMPT = "a {token} {cls}"
STYLE_PROMPT = "{style} image of {object}"


@dataclass(frozen=True)
class Identity:
    """A novel concept: one object of a class with a distinctive two-colour marking."""

    name: str
    cls: str
    body: str
    pattern: str
    mark: str

    @property
    def token(self) -> str:
        return self.name


@dataclass(frozen=True)
class Style:
    """A global rendering: palette, texture and outline."""

    name: str
    palette: str
    texture: str
    outline: str


Combo = tuple[str, str, str, str, str]  # (size, colour, class, position, background)


@dataclass
class World:
    seed: int = 0
    resolution: int = 16
    heldout_combos: frozenset = frozenset()  # attribute combinations never in the pretraining corpus
    experiment_identities: list[Identity] = field(default_factory=list)
    evaluator_identities: list[Identity] = field(default_factory=list)
    experiment_styles: list[Style] = field(default_factory=list)
    evaluator_styles: list[Style] = field(default_factory=list)

    def identity(self, name: str) -> Identity:
        for i in self.experiment_identities:
            if i.name == name:
                return i
        raise choice_error("world.concept", name, [i.name for i in self.experiment_identities])

    def style(self, name: str) -> Style:
        for s in self.experiment_styles:
            if s.name == name:
                return s
        raise choice_error("world.style", name, [s.name for s in self.experiment_styles])

    def vocabulary(self) -> list[str]:
        words = set()
        for template in (CAPTION, CONCEPT_PROMPT, STYLE_PROMPT):
            words |= {w for w in template.replace("{", " ").replace("}", " ").split() if w.isalpha()}
        words |= set(CLASSES) | set(COLOURS) | set(SIZES) | set(POSITIONS) | set(BACKGROUNDS)
        words |= set(RARE_TOKENS) | set(STYLE_WORDS) | set(PATTERNS)
        return sorted(words)

    def fingerprint(self) -> dict:
        """What shipped assets record, so a mismatching world is detected instead of silently used."""
        return {"seed": self.seed, "resolution": self.resolution, "heldout_combos": [list(c) for c in sorted(self.heldout_combos)],
                "experiment_identities": [asdict(i) for i in self.experiment_identities],
                "experiment_styles": [asdict(s) for s in self.experiment_styles]}


def make_world(seed: int = 0, resolution: int = 16, n_experiment_identities: int = 24,
               n_experiment_styles: int = 12) -> World:
    """The world of ``seed``: identities and styles drawn without replacement, then split."""
    rng = np.random.default_rng(seed)
    combos = [(c, b, p, m) for c, b, p, m in itertools.product(CLASSES, COLOURS, PATTERNS, COLOURS) if b != m]
    order = rng.permutation(len(combos))
    # Experiment identities: several per class (crosstalk between same-class concepts is the point).
    per_class = {c: [] for c in CLASSES}
    evaluator = []
    for k in order:
        c, b, p, m = combos[k]
        if len(per_class[c]) < n_experiment_identities // len(CLASSES) + (1 if CLASSES.index(c) < n_experiment_identities % len(CLASSES) else 0):
            per_class[c].append((c, b, p, m))
        else:
            evaluator.append((c, b, p, m))
    exp = [x for c in CLASSES for x in per_class[c]]
    # Interleave classes so the first k concepts cover the classes evenly.
    exp = sorted(exp, key=lambda x: (per_class[x[0]].index(x), CLASSES.index(x[0])))
    experiment_identities = [Identity(RARE_TOKENS[i], *x) for i, x in enumerate(exp)]
    evaluator_identities = [Identity(f"id{i:04d}", *x) for i, x in enumerate(evaluator)]
    styles = list(itertools.product(PALETTES[1:], TEXTURES, OUTLINES))
    sorder = rng.permutation(len(styles))
    experiment_styles = [Style(STYLE_WORDS[i], *styles[k]) for i, k in enumerate(sorder[:n_experiment_styles])]
    evaluator_styles = [Style(f"style{i:03d}", *styles[k]) for i, k in enumerate(sorder[n_experiment_styles:])]
    combos_all = list(itertools.product(SIZES, COLOURS, CLASSES, POSITIONS, BACKGROUNDS))
    heldout = frozenset(combos_all[k] for k in rng.permutation(len(combos_all))[: len(combos_all) // 10])
    return World(seed, resolution, heldout, experiment_identities, evaluator_identities, experiment_styles,
                 evaluator_styles)


@dataclass(frozen=True)
class Scene:
    """One image's content: an object (plain or an identity), its placement, and an optional style."""

    cls: str
    colour: str
    size: str
    position: str
    background: str
    identity: Optional[Identity] = None
    style: Optional[Style] = None
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def combo(self) -> Combo:
        return (self.size, self.colour, self.cls, self.position, self.background)

    def caption(self) -> str:
        return CAPTION.format(size=self.size, colour=self.colour, cls=self.cls, position=self.position,
                              background=self.background)
