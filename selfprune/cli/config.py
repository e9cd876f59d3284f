"""``selfprune config``: show or save the user's defaults (the data folder)."""
from __future__ import annotations

from pathlib import Path

from ..errors import SelfpruneError
from .common import HelpFormatter


def register(sub, parents=()):
    p = sub.add_parser("config", parents=list(parents), formatter_class=HelpFormatter,
                       help="show or save defaults (the data folder used when --data-dir is not given)")
    p.add_argument("--data-dir", default=None, help="save this folder as the default data folder")
    p.add_argument("--reset", action="store_true", help="forget every saved default")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..data import DATA_DIR_ENV, resolve_data_dir
    from ..user_config import read_user_config, user_config_path, write_user_config

    if args.reset:
        user_config_path().unlink(missing_ok=True)
    if args.data_dir is not None:
        folder = Path(args.data_dir).expanduser().resolve()
        if not folder.is_dir():
            raise SelfpruneError(f"--data-dir {folder} is not a folder: give the folder holding wikitext2/, c4/, ...")
        write_user_config(read_user_config() | {"data_dir": str(folder)})
    saved = read_user_config()
    print(f"config file: {user_config_path()}")
    print(f"saved data folder: {saved.get('data_dir') or '(none)'}")
    active = resolve_data_dir(None)
    print(f"data folder in use now (${DATA_DIR_ENV} first): {active or 'none: the Hugging Face hub'}")
    return 0
