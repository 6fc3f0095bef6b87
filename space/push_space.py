#!/usr/bin/env python
"""Builds the Hugging Face Space folder of the demo and uploads it.

    python space/push_space.py --repo_id your-name/arpg-demo            # create/update the Space
    python space/push_space.py --output_dir /tmp/arpg-space --dry_run   # only build the folder, to inspect it

The Space folder is this directory's README.md (Spaces front-matter), app.py and requirements.txt, plus the arpg_hf
package copied from src/ (with its bundled digits model), so the Space needs no release of arpg-hf.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

SPACE_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(os.path.dirname(SPACE_DIR), "src", "arpg_hf")
SPACE_FILES = ("README.md", "app.py", "requirements.txt")
SPACE_FOLDERS = ("demo",)


def build_space_folder(output_dir: str) -> str:
    """Writes the Space's files into `output_dir` (created; must be empty or absent) and returns it."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"{output_dir} is not empty; pass a new or empty folder.")
    os.makedirs(output_dir, exist_ok=True)
    for name in SPACE_FILES:
        shutil.copy2(os.path.join(SPACE_DIR, name), os.path.join(output_dir, name))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SPACE_FOLDERS:
        shutil.copytree(os.path.join(SPACE_DIR, name), os.path.join(output_dir, name), ignore=ignore)
    shutil.copytree(PACKAGE_DIR, os.path.join(output_dir, "arpg_hf"), ignore=ignore)
    return output_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--repo_id", help="The Space, e.g. your-name/arpg-demo (created if missing).")
    parser.add_argument("--output_dir", help="Build here instead of a temporary folder.")
    parser.add_argument("--dry_run", action="store_true", help="Only build the folder; upload nothing.")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if not args.dry_run and not args.repo_id:
        parser.error("Pass --repo_id (or --dry_run with --output_dir to only build the folder).")
    folder = build_space_folder(args.output_dir or tempfile.mkdtemp(prefix="arpg-space-"))
    print(f"Space folder: {folder}")
    if args.dry_run:
        return
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=args.repo_id, repo_type="space", commit_message="Update the demo")
    print(f"https://huggingface.co/spaces/{args.repo_id}")


if __name__ == "__main__":
    main()
