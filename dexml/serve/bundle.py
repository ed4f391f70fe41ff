"""The deployable bundle directory and its manifest.

    artifacts/bundle/
        encoder/        ONNX encoder(s), tokenizer, encoder.json, export_report.json  (export)
        index/          labels.faiss, labels.jsonl, index.json                        (index)
        manifest.json   dataset, params, git revision, metrics, throughput, the chosen
                        retrieval-augmentation settings (`rae`, or null), what the label
                        index ranks by (`scoring`: heads folded into it), sha256 of
                        every file under encoder/ and index/                          (evaluate)

A bundle is accepted only if every file the manifest lists is present with its checksum and
no other file sits under encoder/ or index/: the manifest describes exactly what ships.
No torch here (the predictor verifies bundles).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from dexml import fileio
from dexml.errors import BundleError
from dexml.fileio import sha256_file

MANIFEST_FILE = "manifest.json"
CHECKED_DIRS = ("encoder", "index")
FORMAT_VERSION = 1


def bundle_files(bundle_dir: str | Path) -> list[str]:
    """Relative (posix) paths of all files under encoder/ and index/, sorted."""
    root = Path(bundle_dir)
    return sorted(p.relative_to(root).as_posix()
                  for d in CHECKED_DIRS if (root / d).is_dir()
                  for p in (root / d).rglob("*") if p.is_file())


def checksums(bundle_dir: str | Path) -> dict[str, str]:
    root = Path(bundle_dir)
    return {rel: sha256_file(root / rel) for rel in bundle_files(root)}


def git_revision(cwd: str | Path | None = None) -> str | None:
    """HEAD's commit, or None outside a git checkout (or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def write_manifest(bundle_dir: str | Path, *, dataset: str, params: dict, metrics: dict,
                   throughput: dict, git_rev: str | None, rae: dict | None = None,
                   scoring: dict | None = None) -> dict:
    """Checksum encoder/ and index/ and write manifest.json atomically; returns the manifest.
    rae: the settings Predictor serves with ({"lambda", "temperature", "k"}), or None.
    scoring: what the label index ranks by (heads folded into it), for readers of the manifest."""
    root = Path(bundle_dir)
    for d in CHECKED_DIRS:
        if not (root / d).is_dir():
            raise BundleError(f"{root / d}: directory not found (run the export and index stages)")
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "git_revision": git_rev,
        "params": params,
        "metrics": metrics,
        "throughput": throughput,
        "rae": rae,
        **({"scoring": scoring} if scoring is not None else {}),
        "files": checksums(root),
    }
    fileio.write_json(root / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / MANIFEST_FILE
    manifest = fileio.read_json(path, BundleError, "not a complete bundle: the evaluate stage writes the manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r}, but this dexml reads bundles of format_version "
                          f"{FORMAT_VERSION} (rerun the evaluate stage with this version)")
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise BundleError(f"{path}: expected a JSON object with a non-empty `files` map of sha256 checksums")
    return manifest


def verify_bundle(bundle_dir: str | Path) -> dict:
    """Check every file against the manifest; returns the manifest or raises BundleError."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} not found")
    manifest = read_manifest(root)
    listed = manifest["files"]
    for rel, expected in sorted(listed.items()):
        path = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel.split("/")[0] not in CHECKED_DIRS:
            raise BundleError(f"{root / MANIFEST_FILE}: file entry {rel!r} is outside {', '.join(CHECKED_DIRS)}")
        if not path.is_file():
            raise BundleError(f"bundle {root}: file {rel} is missing (listed in {MANIFEST_FILE})")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"bundle {root}: file {rel} has been modified: sha256 {actual}, "
                              f"expected {expected} (from {MANIFEST_FILE})")
    extra = sorted(set(bundle_files(root)) - set(listed))
    if extra:
        raise BundleError(f"bundle {root}: file {extra[0]} is not listed in {MANIFEST_FILE}"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return manifest
