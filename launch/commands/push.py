"""`seedlm push OUT_DIR REPO_ID [--private] [--revision R] [--dry-run]`."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="a folder made by `seedlm export`")
    parser.add_argument("repo_id", help="OWNER/NAME on the Hugging Face Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None,
                        help="message of the Hub commit; 'Upload <folder name> with seedlm' when not given")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")


def run(args: argparse.Namespace) -> int:
    import sys

    from seedlm.launch.push import PushError, push_folder

    try:
        print(push_folder(args.out_dir, args.repo_id, private=args.private, revision=args.revision,
                          dry_run=args.dry_run, commit_message=args.commit_message))
    except PushError as err:
        print(f"seedlm push: {err}", file=sys.stderr)
        return 2
    return 0
