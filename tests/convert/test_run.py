"""``convert.run`` as a library: refusals before any weights are read, and the summary.

The conversions themselves run end to end (with torch's tiny models) in
``tests/launch/test_convert_cli.py``.
"""

import pathlib

import pytest

from persvid_jax.convert import ConvertError, run


@pytest.mark.parametrize("make, kwargs, words", [
    (lambda t: (t / "src").mkdir(), dict(kind="bogus"), "use one of clip, unet3d, vae"),
    (lambda t: (t / "src").mkdir(), dict(network="vae"), "use one of"),
    (lambda t: ((t / "src").mkdir(), (t / "out").mkdir()), {}, "--out"),
    (lambda t: None, {}, "is not a directory"),
    (lambda t: ((t / "src").mkdir(), (t / "src" / "model.safetensors").write_bytes(b"x")),
     {}, "config.json"),
])
def test_convert_refuses_bad_places_and_sources(tmp_path, make, kwargs, words):
  make(tmp_path)
  before = sorted(p.name for p in tmp_path.iterdir())
  args = dict(kind="clip", config_spec="configs/tiny.py") | kwargs
  with pytest.raises(ConvertError) as info:
    run.convert(args.pop("kind"), tmp_path / "src", tmp_path / "out", **args)
  assert words in str(info.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == before      # no temp sibling left


def test_summary_names_networks_news_and_the_rest():
  result = run.Converted(
      out=pathlib.Path("m2"), src=pathlib.Path("unet"),
      info=dict(networks=["unet"], parameters=1234, seconds=1.25, peak_host_memory_gib=0.5,
                new=["unet/detail/kernel"], widened=[], src="/abs/unet", from_model=None))
  text = run.summary(result, base="m1")
  lines = text.splitlines()
  assert lines[0] == ("converted unet (1,234 parameters) from unet to m2 in 1.2 s, peak host "
                      "memory 0.5 GiB")
  assert "1 parameters new in persvid" in lines[1] and "unet/detail/kernel" in lines[1]
  assert lines[-1].startswith("  the other networks (") and "come from m1" in lines[-1]
  listed = lines[-1].split("(")[1].split(")")[0].split(", ")
  assert "unet" not in listed and "sr_unet" in listed
