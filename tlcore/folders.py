"""ImageFolder trees: listing and validation, with errors that name the files and the fix.

Trees look like ``root/{train,test}/<class_name>/*.png``. :func:`list_split` lists a split without decoding it;
:func:`validate_split` also decodes every image (:func:`tlcore.images.decode_image`) and drops or refuses the
ones that do not decode (:func:`check_decoded`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMG_EXTENSIONS, ImageDecodeError, decode_image, is_grey, show_path

log = logging.getLogger(__name__)
SPLITS = ("train", "test")


class DataValidationError(ValueError):
    """An ImageFolder tree is not usable; the message names the files and the fix."""


@dataclass
class FolderReport:
    """What :func:`validate_imagefolder` found for one split."""

    classes: list[str]
    files: list[tuple[Path, int]]
    skipped: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # files without an image extension
    colour: int = 0  # images whose channels differ somewhere (the others are grey, whatever their file mode)

    @property
    def counts(self) -> dict[str, int]:
        c = {k: 0 for k in self.classes}
        for _, y in self.files:
            c[self.classes[y]] += 1
        return c


def _list(paths: list, n: int = 5) -> str:
    shown = ", ".join(p if isinstance(p, str) else show_path(p) for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _walk_class(cdir: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) below one class folder, nested folders included, hidden names skipped."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(cdir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith("."):
                p = Path(dirpath, f)
                (images if p.suffix.lower() in IMG_EXTENSIONS else others).append(p)
    return sorted(images), sorted(others)


def list_split(split_dir: Path, classes: list[str] | None = None) -> FolderReport:
    """The images of one split folder, by class, without decoding them; :class:`DataValidationError` when the
    folder or its classes are not usable.

    Images are the files with an image extension (torchvision ``ImageFolder``'s list) anywhere below a
    class folder, nested folders included; hidden files and folders are skipped, and other files
    (``notes.txt``, ``Thumbs.db``) are ignored and counted (``FolderReport.ignored``).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataValidationError(
            f"{show_path(split_dir)} does not exist. An ImageFolder root needs train/ and test/ folders, each with "
            f"one sub-folder per class holding its images (e.g. {show_path(split_dir)}/cat/001.png)."
        )
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataValidationError(
            f"{show_path(split_dir)} has no class folders; put each class's images in "
            f"{show_path(split_dir)}/<class_name>/."
        )
    classes = classes or found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataValidationError(
            f"{show_path(split_dir)} has classes that train/ does not: {_list(extra, 20)}. A model cannot learn a "
            f"class it never sees; add training images for them under train/<class>/ or remove them from "
            f"{show_path(split_dir)}."
        )
    files, ignored = [], []
    for y, name in enumerate(classes):
        cdir = split_dir / name
        imgs, others = _walk_class(cdir) if cdir.is_dir() else ([], [])
        ignored += others
        files += [(p, y) for p in imgs]
    if ignored:
        log.info(
            "ignored %d file(s) without an image extension in %s: %s",
            len(ignored),
            show_path(split_dir),
            _list(ignored),
        )
    return FolderReport(classes, files, [], ignored, 0)


def check_decoded(
    split_dir: Path, report: FolderReport, corrupt: list[tuple[Path, str]], skip_corrupt: bool = False
) -> FolderReport:
    """``report`` with the files that did not decode (``corrupt``: ``(path, why)``) left out; raises
    :class:`DataValidationError` for them unless ``skip_corrupt``, and for a training class left with no image."""
    split_dir, bad = Path(split_dir), {p for p, _ in corrupt}
    files = [(p, y) for p, y in report.files if p not in bad]
    held = {y for _, y in files}
    empty = [split_dir / c for y, c in enumerate(report.classes) if y not in held] if split_dir.name == "train" else []
    if corrupt and not skip_corrupt:
        raise DataValidationError(
            f"{len(corrupt)} image(s) in {show_path(split_dir)} are corrupt or unreadable: "
            f"{_list([why for _, why in corrupt], 3)}. Delete or re-export them, or set data.skip_corrupt: true "
            f"to skip them (the count is logged)."
        )
    if corrupt:
        log.warning(
            "skipped %d corrupt image(s) in %s: %s",
            len(corrupt),
            show_path(split_dir),
            _list([why for _, why in corrupt], 3),
        )
    if empty:
        raise DataValidationError(
            f"class folder(s) with no readable images: {_list(empty)}. Add images or delete the empty folder(s)."
        )
    return FolderReport(report.classes, files, [p for p, _ in corrupt], report.ignored, report.colour)


def validate_split(split_dir: Path, skip_corrupt: bool = False, classes: list[str] | None = None) -> FolderReport:
    """Check one split folder (:func:`list_split`) and decode each image with :func:`decode_image`: one that does
    not decode stops the run, or is skipped with ``skip_corrupt``; a training class with no readable image stops
    it. Raises :class:`DataValidationError` on the first kind of problem."""
    rep, corrupt = list_split(split_dir, classes), []
    for p, _ in rep.files:
        try:
            rep.colour += not is_grey(decode_image(p))
        except ImageDecodeError as e:
            corrupt.append((p, str(e)))
    return check_decoded(split_dir, rep, corrupt, skip_corrupt)


def validate_imagefolder(root: str | Path, skip_corrupt: bool = False) -> dict[str, FolderReport]:
    """Validate ``root/train`` and ``root/test``; the test classes must be a subset of train's."""
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(
            f"data root {show_path(root)} does not exist; point data.source/data.target at an "
            f"ImageFolder root or an embedded dataset name."
        )
    train = validate_split(root / "train", skip_corrupt)
    test = validate_split(root / "test", skip_corrupt, classes=train.classes)
    return {"train": train, "test": test}
