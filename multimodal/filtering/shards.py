"""Byte-identical shard copying: the kept records of a webdataset shard, as the input holds them.

A filter must not re-encode what it keeps (DataComp's rule): a record is the
run of consecutive tar members sharing a key (webdataset's grouping: the key
is the member path up to the first dot of its file name), and a kept record's
members are copied as they are, the ``tarfile`` member and its bytes, in input
order. Nothing is decoded except, for the records the report shows, the
caption and the image bytes handed back as they are.

Reading stops at a truncated or damaged tar (what came before is copied); the
scoring pass has already counted what was lost under the read policy.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split of a member name
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members: they belong to no record
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name the way webdataset splits it; None for names without one."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2)) if match else None


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TarRecord:
    """One record of a shard: its key and its members with their bytes."""

    key: str
    members: list[tuple[tarfile.TarInfo, bytes]] = field(default_factory=list)

    def field_bytes(self, extensions: tuple[str, ...]) -> tuple[str, bytes] | None:
        """(extension, bytes) of the first member with one of ``extensions``."""
        for info, data in self.members:
            split = member_key(info.name)
            if split and split[1].lower() in extensions:
                return split[1].lower(), data
        return None


def iter_tar_records(url: str | Path) -> Iterator[TarRecord]:
    """The records of a tar in order, members and bytes untouched; stops at a read error."""
    current: TarRecord | None = None
    try:
        with tarfile.open(url, mode="r|*") as archive:
            for info in archive:
                archive.members = []  # a streamed tar would otherwise keep every member header
                split = member_key(info.name) if info.isreg() and not _META.match(info.name) else None
                if split is None:
                    continue
                if current is not None and current.key != split[0]:
                    yield current  # the record is complete once a member of the next one starts
                    current = None
                handle = archive.extractfile(info)
                data = handle.read() if handle is not None else b""
                if current is None:
                    current = TarRecord(split[0])
                current.members.append((info, data))
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return  # a cut tar ends here; the record it cut is not copied
    if current is not None:
        yield current


@dataclass
class CopiedShard:
    """What copying one shard gave: records seen and kept, the report's pairs, ground-truth flags."""

    records: int = 0
    kept: int = 0
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> caption, image bytes, extension
    clean: dict[str, bool] = field(default_factory=dict)  # key -> not corrupted, for records whose json says


def copy_kept(url: str | Path, out_path: Path, keep: Callable[[str], bool], card_keys: set[str] = frozenset(),
              truth: bool = False) -> CopiedShard:
    """Write the records of ``url`` that ``keep(key)`` accepts to the tar ``out_path``, byte for byte.

    ``card_keys``: records whose caption and image bytes come back for the report.
    ``truth``: also collect ShapesWorld's ``corrupted`` flag from records whose json has one (for the
    report's ground-truth section; scorers never see it).
    """
    result = CopiedShard()
    with open(out_path, "wb") as stream, tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as out:
        for record in iter_tar_records(url):
            result.records += 1
            if keep(record.key):
                result.kept += 1
                for info, data in record.members:
                    out.addfile(info, io.BytesIO(data))
            if record.key in card_keys:
                image = record.field_bytes(IMAGE_EXTENSIONS)
                caption = record.field_bytes(("txt",))
                result.cards[record.key] = {"caption": caption[1].decode("utf-8", "replace").strip() if caption else "",
                                            "image": image[1] if image else None, "ext": image[0] if image else None}
            if truth:
                meta = record.field_bytes(("json",))
                if meta is not None:
                    try:
                        flag = json.loads(meta[1]).get("corrupted")
                    except (ValueError, AttributeError):
                        flag = None
                    if isinstance(flag, bool):
                        result.clean[record.key] = not flag
    return result
