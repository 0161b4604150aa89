"""``python -m blue_plugin.export SESSION_DIR --adapter OUT_DIR [--model OUT_DIR]``: turn a saved
:class:`~blue_plugin.editing.session.EditSession` into artifacts that need no blue_plugin to use.

* ``--adapter OUT_DIR``: a PEFT LoRA adapter folder holding the edits as an exact low-rank
  factorisation (``--rank R`` truncates it and reports the reconstruction error); load it with
  ``PeftModel.from_pretrained(base_model, OUT_DIR)``.
* ``--model OUT_DIR``: the edited model and its tokenizer (``save_pretrained``); load it with
  ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``.

The base model is the one the session was saved for (its ``name_or_path`` in the manifest) unless
``--base`` names it (``smollm2-135m`` or a local Hugging Face folder). Loading the session checks
that it is that model; the key statistics are not needed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from .editing.session import BLUESessionError, EditSession
from .errors import BLUEConfigError
from .model.loading import load_model

logger = logging.getLogger(__name__)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blue_plugin.export", description=__doc__.split("\n\n")[0])
    p.add_argument("session", help="a folder written by EditSession.save")
    p.add_argument("--adapter", metavar="OUT_DIR", help="write a PEFT LoRA adapter folder here")
    p.add_argument("--rank", type=int, default=None, help="truncate each module's factors to this rank (default: exact)")
    p.add_argument("--model", metavar="OUT_DIR", help="write the edited model and tokenizer here (save_pretrained)")
    p.add_argument("--base", default=None, help="the unedited model (default: the one named in the session's manifest)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.adapter and not args.model:
        print("nothing to do: give --adapter OUT_DIR and/or --model OUT_DIR", file=sys.stderr)
        return 2
    if args.rank is not None and args.rank < 1:
        print(f"--rank must be >= 1, got {args.rank}", file=sys.stderr)
        return 2
    try:
        manifest = EditSession.read_manifest(args.session)
        base = args.base or manifest["model"].get("name_or_path")
        if not base:
            raise BLUESessionError("the session's manifest does not name its model; give --base MODEL")
        model, tok = load_model(base)
        session = EditSession.load(args.session, model, tok, undo_depth=0, prepare_statistics=False)
        if args.adapter:
            info = session.export_adapter(args.adapter, rank=args.rank)
            print(json.dumps({"adapter": args.adapter, "modules": info["modules"]}, indent=1))
        if args.model:
            print(json.dumps({"model": str(session.export_model(args.model))}))
    except (BLUESessionError, BLUEConfigError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
