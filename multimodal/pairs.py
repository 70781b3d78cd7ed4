"""Reading image-caption pairs from webdataset shards, and the lost-pairs policy.

A pair record is ``__key__`` + an image (``png``/``jpg``/``jpeg``/``webp``) + a
caption (``txt``) + optional ``json`` metadata. Reading is in shard order and
deterministic (no shuffling), because the activation cache resumes by position.
Text-only readers (``require_image=False``, used when the model reads captions
only) also accept caption-only records and do not decode images: every
record's ``image`` is None.

Damaged data is skipped, never silently: the reader fills a :class:`ReadStats`
with what each shard gave, and :meth:`ReadStats.check` is the one policy every
reader applies (``vlsae extract --max-skipped``, default 1 %): when more than
that fraction of the pairs was lost, reading fails with one line naming the
shards and the fraction. When nothing at all is readable, reading fails too.

How lost pairs are counted (per shard, in pairs, since one record is one pair):

* A record that cannot be decoded (a corrupt image, no caption, the half
  record at a cut) is one lost pair.
* A shard whose tar ends in a read error ("unexpected end of data", an invalid
  header) or, for a local ``.tar``, lacks the zero blocks that end every tar
  file, was cut: everything after the cut is lost too, though never read. What
  it should have held comes, in this order, from a size the data declares
  (``world.json`` of ``vlsae world``, img2dataset's ``NNNNN_stats.json``), or
  else from the other shards when the cut shard is not the last one: writers
  with a fixed shard size fill every shard but the last, so the largest record
  count of a shard read to its end without error is that size (flagged
  ``lower_bound`` when only the last shard was complete, which may be short).
  It lost ``expected - pairs read``.
* A cut shard without such a basis (a single shard, the last one) counts its
  undecodable records only, flagged ``lower_bound``: the loss is "at least".
* A shard read to its end holding fewer records than it declares lost the
  difference (a cut exactly at a record boundary reads as a clean end).

The fraction is ``lost / (read + lost)`` over the shards read so far (a
``--limit`` stops before the rest, so they count neither way).
"""
from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from vlsae.errors import VlsaeError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
DEFAULT_MAX_SKIPPED = 0.01  # the fraction of lost pairs vlsae accepts unless told otherwise
TAR_BLOCK = 512


@dataclass
class PairRecord:
    key: str
    image: Image.Image | None
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def expand_urls(urls: str | Path | list[str]) -> list[str]:
    """Shard paths from a brace pattern ('DIR/{000000..000009}.tar'), a folder, a file, or a list."""
    if isinstance(urls, (list, tuple)):
        out: list[str] = []
        for u in urls:
            out.extend(expand_urls(u))
        return out
    text = str(urls)
    path = Path(text)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise VlsaeError(f"{path} holds no .tar shards; write some with `vlsae world --out {path}`")
        return shards
    from braceexpand import braceexpand
    expanded = list(braceexpand(text))
    missing = [u for u in expanded if "://" not in u and not Path(u).exists()]
    if missing:
        raise VlsaeError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return expanded


def check_max_skipped(max_skipped: float | None, flag: str = "--max-skipped") -> float | None:
    """``max_skipped`` itself when it is a fraction in [0, 1] (or None: no limit); else the one-line error."""
    if max_skipped is None:
        return None
    if isinstance(max_skipped, bool) or not isinstance(max_skipped, (int, float)) or not 0 <= max_skipped <= 1:
        raise VlsaeError(f"{flag} must be a fraction between 0 and 1 (0.01 is 1 %), got {max_skipped!r}")
    return float(max_skipped)


# -- what a reader saw, and the policy ----------------------------------------------

@dataclass
class ShardRead:
    """What reading one shard gave, filled in by the reader as it goes."""

    pairs: int = 0          # records decoded into pairs
    failed: int = 0         # records seen but not decodable
    finished: bool = False  # read to its end or to the error that ended it (not stopped early by a limit)
    error: str = ""         # why the shard ended early ("" when it was read to its end)


def _declared_size(url: str) -> tuple[int, str] | None:
    """The record count the data declares for a local shard, with where it says so."""
    path = Path(url)
    if "://" in url or not path.is_file():
        return None
    stats = path.with_name(f"{path.name.split('.')[0]}_stats.json")  # img2dataset writes one per shard
    try:
        if stats.is_file():
            successes = json.loads(stats.read_text()).get("successes")
            if isinstance(successes, int):
                return successes, stats.name
        world = path.with_name("world.json")  # vlsae world: shard i holds min(shard_size, n - i * shard_size)
        if world.is_file() and path.stem.isdigit():
            summary = json.loads(world.read_text()).get("summary", {})
            n, size, index = int(summary["n"]), int(summary["shard_size"]), int(path.stem)
            if 0 <= index * size < n:
                return min(size, n - index * size), world.name
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # an unreadable declaration is no basis; the count falls back to the other rules
    return None


def _tar_tail_problem(url: str) -> str:
    """Why a local ``.tar`` does not end the way every tar file ends ('' when it does).

    A tar is whole 512-byte blocks closed by two zero blocks; Python's tarfile
    reads a cut at a header as a clean end, so this is what tells that cut apart.
    """
    path = Path(url)
    if "://" in url or path.suffix != ".tar":
        return ""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(0, size - 2 * TAR_BLOCK))
            tail = handle.read()
    except OSError:
        return ""
    if size % TAR_BLOCK:
        return f"its {size} bytes are not whole {TAR_BLOCK}-byte tar blocks"
    if size < 2 * TAR_BLOCK or tail.count(0) != len(tail):
        return "the tar's end-of-archive blocks are missing"
    return ""


def _count(n: int, noun: str) -> str:
    """'1 pair', '2 pairs': the messages count in words."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _error_text(exc: BaseException) -> str:
    """One short line for a read error (webdataset appends streams and URLs to the arguments)."""
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc.args[0]) if exc.args else "")
    message = (message.split(" @ ")[0].strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@dataclass
class ReadStats:
    """The per-shard counts of one read of ``urls`` and the lost-pairs policy (see the module docstring).

    ``max_skipped`` is the largest lost fraction :meth:`check` accepts (None:
    any). Readers fill :attr:`shards`; everything else is derived from them, so a
    copy sent from a reader process (:meth:`absorb`) says the same.
    """

    urls: list[str]
    max_skipped: float | None = None
    shards: dict[str, ShardRead] = field(default_factory=dict)
    declared: dict[str, tuple[int, str] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.max_skipped = check_max_skipped(self.max_skipped)

    def shard(self, url: str) -> ShardRead:
        """The counts of ``url`` (created on first use)."""
        return self.shards.setdefault(url, ShardRead())

    def reset(self) -> None:
        """Forget the counts (a reader starts over from its first shard)."""
        self.shards = {}

    def absorb(self, other: ReadStats) -> None:
        """Take the counts of a copy filled elsewhere (a reader process)."""
        self.shards = {url: ShardRead(**asdict(read)) for url, read in other.shards.items()}
        self.declared.update(other.declared)

    def _declared(self, url: str) -> tuple[int, str] | None:
        if url not in self.declared:
            self.declared[url] = _declared_size(url)
        return self.declared[url]

    @property
    def pairs(self) -> int:
        """Pairs read."""
        return sum(read.pairs for read in self.shards.values())

    def losses(self) -> dict[str, dict[str, Any]]:
        """url -> the loss of every shard that lost pairs or was cut (the rule of the module docstring)."""
        last = self.urls[-1] if self.urls else None
        complete = {url: read.pairs + read.failed for url, read in self.shards.items() if read.finished and not read.error}
        full = max((n for url, n in complete.items() if url != last), default=None)  # the writer's shard size
        out: dict[str, dict[str, Any]] = {}
        for url, read in self.shards.items():
            declared = self._declared(url) if read.finished else None
            expected, basis = declared if declared is not None else (None, None)
            estimated = False
            if expected is None and read.error and complete and url != last:
                expected, basis = max(complete.values()), "the largest complete shard"
                estimated = full is None  # only the (maybe short) last shard to go by: at least that many
            lost = read.failed if expected is None else max(expected - read.pairs, read.failed)
            if lost or read.error:
                out[url] = {"lost": lost, "read": read.pairs, "failed": read.failed, "expected": expected,
                            "basis": basis, "error": read.error or None,
                            "lower_bound": bool(read.error) and (expected is None or estimated)}
        return out

    @property
    def lost(self) -> int:
        """Pairs lost (a lower bound where a cut shard's size is unknown)."""
        return sum(loss["lost"] for loss in self.losses().values())

    @property
    def fraction(self) -> float:
        """The lost share of what the shards read so far held: ``lost / (read + lost)``."""
        lost = self.lost
        total = self.pairs + lost
        return lost / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        """The record for a manifest: lost pairs, their fraction, the limit and the damaged shards."""
        losses = self.losses()
        return {"pairs": sum(loss["lost"] for loss in losses.values()), "fraction": round(self.fraction, 6),
                "read": self.pairs, "shards_read": len(self.shards), "max_skipped": self.max_skipped,
                "lower_bound": any(loss["lower_bound"] for loss in losses.values()), "by_shard": losses}

    def describe(self, most: int = 3) -> str:
        """The damaged shards, worst first, in words."""
        losses = sorted(self.losses().items(), key=lambda item: -item[1]["lost"])
        parts = []
        for url, loss in losses[:most]:
            at_least = "at least " if loss["lower_bound"] else ""
            if loss["expected"]:
                head = (f"{url} lost {at_least}{loss['lost']} of its {loss['expected']}{' or more' if at_least else ''} "
                        f"pairs ({loss['lost'] / loss['expected']:.0%}")
            elif loss["lost"] or not loss["lower_bound"]:
                head = f"{url} lost {at_least}{_count(loss['lost'], 'pair')} ("
            else:
                head = f"{url} lost an unknown number of pairs ("
            notes = [f"{_count(loss['failed'], 'undecodable record')}"] if loss["failed"] else []
            if loss["error"]:
                notes.append(f"truncated after {loss['read'] + loss['failed']} records: {loss['error']}")
            notes.append(f"size from {loss['basis']}" if loss["basis"] else
                         ("its size is unknown" if loss["lower_bound"] else ""))
            parts.append(head + (": " if head.endswith("%") else "") + ", ".join(n for n in notes if n) + ")")
        if len(losses) > most:
            parts.append(f"and {len(losses) - most} more damaged shards")
        return "; ".join(parts)

    def check(self, flag: str = "--max-skipped") -> None:
        """Raise the one-line error when more than ``max_skipped`` of the pairs were lost."""
        if self.max_skipped is None or self.fraction <= self.max_skipped:
            return
        lost, fraction = self.lost, self.fraction
        accept = math.ceil(round(fraction * 1000, 6)) / 1000
        at_least = "at least " if self.summary()["lower_bound"] else ""
        raise VlsaeError(f"lost {at_least}{lost} of {self.pairs + lost} pairs ({fraction:.1%}) reading {len(self.shards)} "
                         f"shard(s), more than {flag} {self.max_skipped:g} allows: {self.describe()}; repair or remove "
                         f"the damaged shards, or pass {flag} {accept:g} to accept the loss")

    def warning(self) -> str | None:
        """The line to print when pairs were lost (or a shard was cut) within the limit; None when nothing was."""
        if not self.losses():
            return None
        lost = self.lost
        at_least = "at least " if self.summary()["lower_bound"] else ""
        return (f"vlsae: skipped {at_least}{_count(lost, 'pair')} ({self.fraction:.1%}) reading "
                f"{len(self.shards)} shard(s): {self.describe()}")


# -- the reader ---------------------------------------------------------------------

def _decode(sample: dict[str, Any], require_image: bool = True) -> PairRecord:
    """One record; a text-only reader (``require_image`` false) neither needs nor decodes its image."""
    key = sample.get("__key__")
    image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if key is None or (image_bytes is None and require_image) or "txt" not in sample:
        raise ValueError("record lacks __key__, an image or a caption")
    image = None
    if image_bytes is not None and require_image:
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
        image = image.convert("RGB")
    caption = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else str(sample["txt"])
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return PairRecord(key=str(key), image=image, caption=caption.strip(), meta=meta)


class PairReader:
    """Iterate pair records of ``urls`` in order, counting what is lost in :attr:`stats`.

    At the end of the shards the reader applies the policy (:meth:`ReadStats.check`
    with ``max_skipped``; None, the default of the plain readers, only warns) and
    prints one warning line for pairs skipped within it.
    """

    def __init__(self, urls: str | Path | list[str], warn: bool = True, require_image: bool = True,
                 max_skipped: float | None = None):
        self.urls = expand_urls(urls)
        self.require_image = require_image  # False: a text-only reader, records keep image=None
        self.warn = warn
        self.stats = ReadStats(self.urls, max_skipped=max_skipped)
        self.errors: list[str] = []

    @property
    def read(self) -> int:
        """Pairs read so far."""
        return self.stats.pairs

    @property
    def skipped(self) -> int:
        """Pairs lost so far (see the module docstring for the rule)."""
        return self.stats.lost

    def _note(self, exc: BaseException) -> None:
        if len(self.errors) < 3:
            self.errors.append(_error_text(exc))

    def _shard(self, url: str) -> Iterator[PairRecord]:
        from webdataset.tariterators import tarfile_samples

        read = self.stats.shard(url)

        def handler(exc: Exception) -> bool:
            """A stream error (truncated tar, unreadable file) ends the shard: note it and go on."""
            self._note(exc)
            if isinstance(exc, ValueError) and "duplicate file name" in str(exc.args[0] if exc.args else ""):
                return True  # a repeated member is ignored; its record still reads
            read.error = read.error or _error_text(exc)
            return True

        for sample in tarfile_samples([{"url": url}], handler=handler):
            try:
                record = _decode(sample, self.require_image)
            except Exception as exc:  # a corrupt record must not stop the reader
                read.failed += 1
                self._note(exc)
                continue
            read.pairs += 1
            yield record
        read.error = read.error or _tar_tail_problem(url)
        read.finished = True

    def shard_records(self, url: str) -> Iterator[PairRecord]:
        """The records of one shard, counted in :attr:`stats`, without the end-of-read checks: for a
        reader of part of the shards (one rank's), whose counts are merged and checked over all of them."""
        return self._shard(url)

    def __iter__(self) -> Iterator[PairRecord]:
        self.stats.reset()
        self.errors = []
        for url in self.urls:
            yield from self._shard(url)
        if self.stats.pairs == 0:
            why = f" ({self.errors[0]})" if self.errors else ""
            raise VlsaeError(f"no readable image-caption pairs in {self.urls[0]}" +
                             (f" and {len(self.urls) - 1} more shards" if len(self.urls) > 1 else "") + why)
        self.stats.check()
        message = self.stats.warning()
        if message and self.warn:
            print(message, file=sys.stderr)


def iter_pairs(urls: str | Path | list[str], require_image: bool = True,
               max_skipped: float | None = None) -> Iterator[PairRecord]:
    """Pair records of the shards, in order (see :class:`PairReader`); ``require_image=False`` reads
    captions only (caption-only shards too; images are not decoded); ``max_skipped`` fails the read
    when more than that fraction of the pairs is lost (None: warn only)."""
    return iter(PairReader(urls, require_image=require_image, max_skipped=max_skipped))


def batched_pairs(urls: str | Path | list[str], batch_size: int,
                  max_skipped: float | None = None) -> Iterator[list[PairRecord]]:
    """Lists of up to ``batch_size`` consecutive records."""
    batch: list[PairRecord] = []
    for record in iter_pairs(urls, max_skipped=max_skipped):
        batch.append(record)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
