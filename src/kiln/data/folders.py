"""A folder of examples the way image and audio datasets come: one subfolder per class (its name the label), or
files directly in the folder (no labels). Shared by kiln.data.images and kiln.data.audio."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError


def scan_class_folders(path: Path, suffixes, noun: str, item: str, empty_hint: str):
    """(files, class folder name per file or None, files skipped by their suffix, whether there were classes).
    `noun`/`item` name the files in the errors ("images"/"image"); `empty_hint` ends a class folder's error."""
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    classes = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in suffixes]
    if classes and loose:
        raise KilnError(f"{path}: holds {noun} ({loose[0].name}, ...) and class subfolders ({classes[0].name}, ...); "
                        f"put every {item} in its class's subfolder")
    files, names, skipped = [], [], 0
    for folder in classes or [path]:
        inside = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        found = [p for p in inside if p.suffix.lower() in suffixes]
        skipped += len(inside) - len(found)
        if classes and not found:
            raise KilnError(f"{folder}: a class folder with no {noun} ({empty_hint})")
        files += found
        names += [folder.name if classes else None] * len(found)
    return files, names, skipped, bool(classes)
