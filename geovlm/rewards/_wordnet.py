"""WordNet 3.0 for NLTK's METEOR (its synonym stage), without ``nltk.download``.

``load_wordnet()`` returns an NLTK ``WordNetCorpusReader``, from the first of:

1. NLTK's own data (``corpora/wordnet`` or ``wordnet.zip`` on ``nltk.data.path``), if installed;
2. Debian's WordNet 3.0 database (``apt-get install -y --no-install-recommends wordnet-base
   wordnet-sense-index``: ``/usr/share/wordnet``), assembled once into
   ``<cache>/nltk_data/corpora/wordnet``: copies of the 14 database files NLTK reads plus the
   ``lexnames`` file (the 45 lexicographer files of WordNet 3.0, which Debian ships only as a
   manual page). ``<cache>/nltk_data`` is then appended to ``nltk.data.path`` (NLTK refuses to
   read corpora outside its data roots, links included), so ``nltk.corpus.wordnet`` works too.

If neither exists it raises ``WordNetMissingError`` saying how to install one.
"""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path

from geovlm.atomic import staging_dir

DEBIAN_WORDNET = Path("/usr/share/wordnet")
INSTALL_HINT = (
    "apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index "
    "(or python -m nltk.downloader wordnet)"
)

# What NLTK's WordNetCorpusReader opens, less lexnames (written below).
_DATABASE_FILES = (
    "cntlist.rev",
    "index.sense",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
)

# lexnames(5WN): file number, name, syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb).
_LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2),
    ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
)


class WordNetMissingError(RuntimeError):
    """No WordNet database for NLTK's METEOR."""


def cache_dir() -> Path:
    """``$GEOVLM_CACHE``, else ``$XDG_CACHE_HOME/geovlm``, else ``~/.cache/geovlm``."""
    if os.environ.get("GEOVLM_CACHE"):
        return Path(os.environ["GEOVLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "geovlm"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*_DATABASE_FILES, "lexnames"))


def assemble(source: Path, target: Path) -> Path:
    """An NLTK-readable WordNet folder ``target``: the database files of ``source`` plus
    ``lexnames``, written through a temporary folder and a rename."""
    if _complete(target):
        return target
    missing = [name for name in _DATABASE_FILES if not (source / name).is_file()]
    if missing:
        raise WordNetMissingError(
            f"WordNet database incomplete under {source} (missing {', '.join(missing)}): "
            f"install it with {INSTALL_HINT}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target.parent, ".wordnet-")
    try:
        for name in _DATABASE_FILES:
            shutil.copyfile(source / name, staging / name)
        lines = (f"{i:02d}\t{name}\t{category}\n" for i, (name, category) in enumerate(_LEXNAMES))
        (staging / "lexnames").write_text("".join(lines))
        if _complete(target):  # another process finished first
            shutil.rmtree(staging)
            return target
        if target.exists():  # a stale folder (e.g. dangling links): replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _complete(target):  # another process may have won the race
            raise
    return target


def _nltk_has_wordnet() -> bool:
    import nltk

    for resource in ("corpora/wordnet", "corpora/wordnet.zip"):
        try:
            nltk.data.find(resource)
        except LookupError:
            continue
        return True
    return False


@cache
def load_wordnet(source: Path = DEBIAN_WORDNET):
    """NLTK's WordNet reader, installed from ``source`` if NLTK has none (module docstring)."""
    import nltk

    if not _nltk_has_wordnet():
        if not source.is_dir():
            raise WordNetMissingError(
                f"NLTK's METEOR needs WordNet: none on nltk.data.path nor under {source}; "
                f"install it with {INSTALL_HINT}"
            )
        root = cache_dir() / "nltk_data"
        assemble(source, root / "corpora" / "wordnet")
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    return wordnet
