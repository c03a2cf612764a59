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

WORLD_VERSION = 2  # v2: patterned and styled objects in the pretraining corpus (see docs/mini_world.md)
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
# Caption grammar (v2): the attribute caption, plus an optional marking and an optional style phrase,
# all in plain world words. Rare tokens and experiment style words never appear in it.
CAPTION = "a {size} {colour} {cls} at {position} on {background}"
MARKING_PHRASE = "with {mark} {pattern}"          # after the class: "a red circle with green dot at ..."
STYLE_PHRASE = "in {palette} {texture} {outline}"  # at the end: "... on white in sepia grain darkedge"
OUTLINE_WORDS = {"none": "noedge", "dark": "darkedge", "light": "lightedge"}
CAPTION_PARTS = ("size", "colour", "marking", "position", "background", "style")  # what a caption may leave out
CONCEPT_PROMPT = "a {token} {cls}"
STYLE_PROMPT = "{style} image of {object}"
HELDOUT_SHARE = 0.1  # share of each kind of attribute combination kept out of pretraining (attribute accuracy)


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
    heldout_combos: frozenset = frozenset()  # (size, colour, class, position, background) never in pretraining
    heldout_markings: frozenset = frozenset()  # (class, body, pattern, mark) never in pretraining
    heldout_styles: frozenset = frozenset()    # (palette, texture, outline) never in pretraining
    experiment_identities: list[Identity] = field(default_factory=list)
    evaluator_identities: list[Identity] = field(default_factory=list)
    experiment_styles: list[Style] = field(default_factory=list)
    evaluator_styles: list[Style] = field(default_factory=list)

    def identity(self, name: str, field: str = "world.concept") -> Identity:
        """The experiment identity ``name``; else a one-line error naming ``field`` (the setting it came from)."""
        for i in self.experiment_identities:
            if i.name == name:
                return i
        raise choice_error(field, name, [i.name for i in self.experiment_identities])

    def style(self, name: str, field: str = "world.style") -> Style:
        """The experiment style ``name``; else a one-line error naming ``field`` (the setting it came from)."""
        for s in self.experiment_styles:
            if s.name == name:
                return s
        raise choice_error(field, name, [s.name for s in self.experiment_styles])

    def vocabulary(self) -> list[str]:
        words = set()
        for template in (CAPTION, CONCEPT_PROMPT, STYLE_PROMPT):
            words |= {w for w in template.replace("{", " ").replace("}", " ").split() if w.isalpha()}
        words |= set(CLASSES) | set(COLOURS) | set(SIZES) | set(POSITIONS) | set(BACKGROUNDS)
        words |= set(RARE_TOKENS) | set(STYLE_WORDS) | set(PATTERNS)
        for template in (MARKING_PHRASE, STYLE_PHRASE):
            words |= {w for w in template.split() if w.isalpha()}
        words |= set(PALETTES) | set(TEXTURES) | set(OUTLINE_WORDS.values())
        return sorted(words)

    def pretraining_markings(self) -> list[tuple[str, str, str, str]]:
        """Markings the corpus may show: every (class, body, pattern, mark) except the experiment
        identities' (the concepts stay novel) and the held-out ones (attribute accuracy)."""
        excluded = {identity_key(i) for i in self.experiment_identities} | self.heldout_markings
        return [identity_key(i) for i in self.evaluator_identities if identity_key(i) not in excluded]

    def pretraining_styles(self) -> list[tuple[str, str, str]]:
        """Styles the corpus may show: every (palette, texture, outline) except the experiment styles'
        (the invented style words stay novel) and the held-out ones."""
        excluded = {style_key(s) for s in self.experiment_styles} | self.heldout_styles
        return [style_key(s) for s in self.evaluator_styles if style_key(s) not in excluded]

    def fingerprint(self) -> dict:
        """What shipped assets record, so a mismatching world is detected instead of silently used."""
        return {"version": WORLD_VERSION, "seed": self.seed, "resolution": self.resolution,
                "heldout_combos": [list(c) for c in sorted(self.heldout_combos)],
                "heldout_markings": [list(c) for c in sorted(self.heldout_markings)],
                "heldout_styles": [list(c) for c in sorted(self.heldout_styles)],
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
        quota = n_experiment_identities // len(CLASSES) + (CLASSES.index(c) < n_experiment_identities % len(CLASSES))
        if len(per_class[c]) < quota:
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
    # v2: markings and styles held out of pretraining too (drawn after v1's draws, which stay the same).
    markings = [identity_key(i) for i in evaluator_identities]
    heldout_markings = frozenset(markings[k]
                                 for k in rng.permutation(len(markings))[: round(HELDOUT_SHARE * len(markings))])
    styles_ev = [style_key(s) for s in evaluator_styles]
    heldout_styles = frozenset(styles_ev[k]
                               for k in rng.permutation(len(styles_ev))[: round(HELDOUT_SHARE * len(styles_ev))])
    return World(seed, resolution, heldout, heldout_markings, heldout_styles, experiment_identities,
                 evaluator_identities, experiment_styles, evaluator_styles)


def identity_key(identity: Identity) -> tuple[str, str, str, str]:
    return (identity.cls, identity.body, identity.pattern, identity.mark)


def style_key(style: Style) -> tuple[str, str, str]:
    return (style.palette, style.texture, style.outline)


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

    def caption(self, drop: frozenset = frozenset()) -> str:
        """The full attribute caption in plain world words (never a rare token or a style word): the
        object, its marking if it has one, its placement, and its style's palette, texture and outline.
        ``drop``: parts left out, any of CAPTION_PARTS (partial captions, as real captions mention only
        some attributes)."""
        words = ["a", *[w for part, w in (("size", self.size), ("colour", self.colour)) if part not in drop], self.cls]
        if self.identity is not None and "marking" not in drop:
            words.append(MARKING_PHRASE.format(mark=self.identity.mark, pattern=self.identity.pattern))
        if "position" not in drop:
            words.append(f"at {self.position}")
        if "background" not in drop:
            words.append(f"on {self.background}")
        if self.style is not None and "style" not in drop:
            words.append(STYLE_PHRASE.format(palette=self.style.palette, texture=self.style.texture,
                                             outline=OUTLINE_WORDS[self.style.outline]))
        return " ".join(words)
