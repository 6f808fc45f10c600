"""Bad input files are one line on stderr naming file, record and field, exit code 2; --debug
shows the traceback."""
import json

import pytest

from mmcl import cli


def _convert(fmt, src, out, *extra):
  return cli.main(["data", "convert", "--format", fmt, "--input", str(src), "--output", str(out),
                   *extra])


def _one_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_undecodable_bytes_name_file_line_and_encoding(tmp_path, capsys):
  src = tmp_path / "seqs.txt"
  src.write_bytes(b"1 1\n1 2\n2 1\n2 \xff\xfe3\n")
  assert _convert("sasrec", src, tmp_path / "out") == 2
  line = _one_line(capsys)
  assert f"{src}:4:" in line and "at column 3 are not valid utf-8" in line
  assert not (tmp_path / "out" / "metadata.json").exists()


def test_undecodable_csv_cell(tmp_path, capsys):
  src = tmp_path / "caps.csv"
  src.write_bytes(b"image,caption\na.png,fine\nb.png,caf\xe9\n")
  assert _convert("image-captions", src, tmp_path / "out", "--image-root", str(tmp_path)) == 2
  assert f"{src}:3:" in _one_line(capsys)


def test_negative_ratings_need_a_flag(tmp_path, capsys):
  folder = tmp_path / "ml"
  folder.mkdir()
  rows = [f"{u}::{m}::{r}::{t}" for u, m, r, t in
          [(1, 10, 4, 1), (1, 11, 5, 2), (1, 12, 3, 3), (2, 10, -1, 4), (2, 11, 2, 5),
           (2, 12, 1, 6)]]
  (folder / "ratings.dat").write_text("\n".join(rows) + "\n")
  assert _convert("movielens", folder, tmp_path / "out") == 2
  line = _one_line(capsys)
  assert "ratings.dat:4, field 'Rating': negative rating -1" in line
  assert _convert("movielens", folder, tmp_path / "out", "--allow-negative-ratings") == 0


def test_malformed_dataset_metadata_is_one_line(shapes_dir, tmp_path, capsys):
  import shutil
  data = tmp_path / "ds"
  shutil.copytree(shapes_dir, data)
  meta = json.loads((data / "metadata.json").read_text())
  meta["format_version"] = 99
  (data / "metadata.json").write_text(json.dumps(meta))
  assert cli.main(["train", "--config", "experiments/clip_shapes.py:tiny", "--workdir",
                   str(tmp_path / "w"), "--set", f"data.dir={data}"]) == 2
  line = _one_line(capsys)
  assert f"{data}/metadata.json: key 'format_version' is 99" in line
  assert not (tmp_path / "w").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
  src = tmp_path / "seqs.txt"
  src.write_bytes(b"1 \xff\n")
  from data_pipelines.converters.common import ConversionError
  with pytest.raises(ConversionError):
    cli.main(["--debug", "data", "convert", "--format", "sasrec", "--input", str(src),
              "--output", str(tmp_path / "out")])
  monkeypatch.setenv("MMCL_DEBUG", "1")
  with pytest.raises(ConversionError):
    _convert("sasrec", src, tmp_path / "out")
