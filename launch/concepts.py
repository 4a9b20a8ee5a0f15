"""Manage a concept database (photos -> subject -> features -> database).

  python -m launch.concepts add    --db DIR --name NAME --images IMG [IMG ...] [--masks M ...]
  python -m launch.concepts list    --db DIR [--json] [--step N]
  python -m launch.concepts remove  --db DIR --name NAME
  python -m launch.concepts restore --db DIR --step N

``add`` segments the subject of every photo (or uses the given masks),
encodes the reference feature and extracts the detail features with the
model (``--model``, default the shipped demo model), and stores the averaged
features under NAME as a new database version. Bad input (unreadable image,
invalid or duplicate name, full database) exits with status 2 and one line
on stderr, leaving the database as it was. ``restore`` makes an older
version the newest again (after a damaged one: ``open`` names the last good
version); ``list --step N`` shows any kept version.
"""

from __future__ import annotations

import json
import sys

from launch import _common


def _parse(argv):
  p = _common.ArgumentParser(prog="python -m launch.concepts",
                              description="Manage a persvid_jax concept database.")
  sub = p.add_subparsers(dest="command", required=True)
  add = sub.add_parser("add", help="register a concept from one or more photos")
  add.add_argument("--db", required=True, help="database directory (created if absent)")
  add.add_argument("--name", required=True, help="concept name, used in prompts as <NAME>")
  add.add_argument("--images", nargs="+", required=True, help="photos of the subject")
  add.add_argument("--masks", nargs="+", help="optional subject masks, one per image")
  add.add_argument("--model", help="exported model or training workdir (default: demo)")
  ls = sub.add_parser("list", help="list the stored concepts")
  ls.add_argument("--db", required=True)
  ls.add_argument("--json", action="store_true", help="machine-readable output")
  ls.add_argument("--step", type=_common.int_range(0),
                  help="a kept older version (default: the newest)")
  rm = sub.add_parser("remove", help="remove a concept")
  rm.add_argument("--db", required=True)
  rm.add_argument("--name", required=True)
  rs = sub.add_parser("restore", help="make an older version the newest again")
  rs.add_argument("--db", required=True)
  rs.add_argument("--step", type=_common.int_range(0), required=True,
                  help="the version to restore")
  return p.parse_args(argv)


def main(argv=None) -> int:
  """``python -m launch.concepts`` (see the module docstring); returns the exit status."""
  _common.quiet()           # before any library import (transformers logs on import)
  args = _parse(sys.argv[1:] if argv is None else argv)

  def body() -> int:
    _common.compilation_cache()
    # After the flags are checked: these import jax and orbax (seconds).
    from persvid_jax.concepts import build
    from persvid_jax.concepts import database as db_lib
    from persvid_jax.pipeline import model as model_lib
    if args.command == "list":
      db = db_lib.ConceptDatabase.open(args.db, step=args.step)
      rows = db_lib.describe(db)
      if args.json:
        print(json.dumps(dict(db=str(args.db), step=db.step, capacity=db.capacity,
                              concepts=rows), indent=2))
      else:
        print(f"{args.db}: {len(rows)}/{db.capacity} concepts (version {db.step})")
        for r in rows:
          print(f"  <{r['name']}>  slot {r['slot']:2d}  {r['images']} image(s)  {r['created']}")
      return 0
    if args.command == "remove":
      db = db_lib.ConceptDatabase.open(args.db)
      db.remove(args.name)
      print(f"removed <{args.name}> from {args.db} (version {db.step})")
      return 0
    if args.command == "restore":
      db = db_lib.ConceptDatabase.open(args.db, step=args.step)
      db.restore_as_latest()
      print(f"restored version {args.step} of {args.db} as version {db.step} "
            f"({len(db.concepts)} concepts)")
      return 0

    # add: every cheap check first, then the model.
    db_lib.validate_name(args.name)
    # A --db that is a file or read-only would otherwise fail only at the
    # commit, after the model has loaded and encoded the photos.
    db_lib.check_writable(args.db)
    exists = db_lib.ConceptDatabase.exists(args.db)
    db = db_lib.ConceptDatabase.open(args.db) if exists else None
    if db is not None:
      db.check_new_name(args.name)
    photos = build.load_photos(args.images, args.masks)
    model = model_lib.load_model(args.model)
    if db is None:
      db = db_lib.ConceptDatabase.create(args.db, model.config, model.feature_id, commit=False)
    elif db.feature_id != model.feature_id:
      raise db_lib.DatabaseError(
          f"{args.db} was built with another model (feature id {db.feature_id}, this model "
          f"{model.feature_id}); use that model (--model) or a new database")
    record, features = build.add_concept(db, args.name, model, photos, args.images)
    cover = ", ".join(f"{p['coverage']:.0%}" for p in features.provenance)
    print(f"added <{record.name}> to {args.db}: slot {record.slot}, {record.num_images} "
          f"image(s), subject coverage {cover} (version {db.step})")
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
