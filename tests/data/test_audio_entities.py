"""Audio decode/resample/log-mel (numpy = jitted JAX), the audio-folder converter on the mirdata
fixtures and on files written here, and the entity converters (hetrec Last.fm, embeddings)."""
import csv
import json

import numpy as np
import pytest
import soundfile

from data_pipelines import audio
from data_pipelines import convert as convert_lib
from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines import schemas
from data_pipelines.converters import common
from data_pipelines.converters import lastfm


def _sine(freq, sr, seconds, channels=1):
  t = np.arange(int(sr * seconds)) / sr
  x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
  return np.stack([x] * channels, axis=1)


def test_resample_keeps_frequency_and_log_mel_backends_agree(tmp_path):
  sr_in = 44100
  soundfile.write(tmp_path / "a.flac", _sine(1000.0, sr_in, 1.0, channels=2), sr_in)
  wave, sr = audio.decode_audio((tmp_path / "a.flac").read_bytes())
  assert sr == sr_in and wave.shape == (2, sr_in)
  y = audio.resample(wave.mean(0), sr, 16000)
  assert y.shape == (16000,)
  spectrum = np.abs(np.fft.rfft(y[2000:14000]))
  assert abs(np.argmax(spectrum) * 16000 / 12000 - 1000.0) < 2.0
  lm = audio.LogMel(sample_rate=16000, n_fft=400, hop=160, n_mels=40)
  host = lm.numpy(y[None])
  assert host.shape == (1, 1 + (16000 - 400) // 160, 40)
  dev = np.asarray(lm.jax(y[None]))
  np.testing.assert_allclose(dev, host, atol=2e-3, rtol=1e-4)
  centers = audio.mel_to_hz(np.linspace(audio.hz_to_mel(0), audio.hz_to_mel(8000), 42))[1:-1]
  peak = np.argmax(host[0].mean(0))
  assert abs(centers[peak] - 1000.0) < (centers[peak + 1] - centers[peak - 1])
  fb = audio.mel_filterbank(16000, 400, 40)
  assert fb.shape == (201, 40) and np.isclose(fb.max(), 1.0, atol=0.1)
  with pytest.raises(ValueError, match="audio decode failed"):
    audio.decode_audio(b"RIFF0000WAVEjunk")


def _annotations(shared_data, tmp_path):
  root = shared_data / "mirdata-audio-fixtures"
  gk = "giantsteps_key/{}/10089 Jason Sparks - Close My Eyes feat. J. Little (Original Mix).{}"
  bk = "beatport_key/{}/100066 Lindstrom - Monsteer (Original Mix).{}"
  gt = "giantsteps_tempo/giantsteps-tempo-dataset-0b7d47ba8cae59d3535a02e3db69e2cf6d0af5bb/" \
       "annotations/jams/28952.LOFI.jams"
  jams = json.loads((root / gt).read_text())
  tempo = next(a for a in jams["annotations"] if a["namespace"] == "tempo")["data"]
  tempo = tempo[0]["value"] if isinstance(tempo, list) else tempo["value"][0]
  rows = [
      {"path": gk.format("audio", "mp3"), "key": (root / gk.format("keys_gs+", "txt")).read_text(),
       "tempo": "", "tags": ""},
      {"path": bk.format("audio", "mp3"), "key": (root / bk.format("keys", "txt")).read_text(),
       "tempo": "", "tags": ""},
      {"path": "giantsteps_tempo/audio/28952.LOFI.mp3", "key": "", "tempo": str(tempo),
       "tags": "trance"},
      {"path": "gtzan_genre/gtzan_genre/genres/country/country.00000.wav", "key": "",
       "tempo": (root / "gtzan_genre/gtzan_tempo_beat-main/tempo/gtzan_country_00000.bpm")
       .read_text().strip(), "tags": "country"},
      {"path": "ballroom/B_1.0/audio/Waltz/Media-105901.wav", "key": "",
       "tempo": (root / "ballroom/B_1.0/annotations/tempo/Media-105901.bpm").read_text().strip(),
       "tags": "Waltz;ballroom"},
  ]
  with open(tmp_path / "ann.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["path", "key", "tempo", "tags"])
    w.writeheader()
    w.writerows(rows)
  return root


def test_mirdata_fixtures(shared_data, tmp_path):
  root = _annotations(shared_data, tmp_path)
  meta = convert_lib.convert("audio-folder", tmp_path / "ann.csv", tmp_path / "au",
                             audio_root=str(root))
  assert meta["splits"]["train"]["num_examples"] == 5 and meta["tag_names"][0] == "trance"
  recs = records.ArrayRecordSource(tmp_path / "au", "train").read_many(range(5))
  # SOURCE.md: 44.1/44.1/22.05 kHz stereo MP3s of ~2 s, 22.05 kHz mono 30.08 s, 44.1 kHz 31.79 s.
  assert [r["sample_rate"] for r in recs] == [44100, 44100, 22050, 22050, 44100]
  assert [r["num_channels"] for r in recs] == [2, 2, 2, 1, 1]
  secs = [r["num_frames"] / r["sample_rate"] for r in recs]
  assert abs(secs[0] - 2.0) < 0.1 and abs(secs[3] - 30.08) < 0.01 and abs(secs[4] - 31.79) < 0.01
  assert [r["key"] for r in recs] == [schemas.parse_key("D major"), schemas.parse_key("D minor"),
                                      -1, -1, -1] == [2, 14, -1, -1, -1]
  assert recs[3]["tempo"] == pytest.approx(85.53, abs=0.01) and recs[4]["tempo"] == 84.0
  assert abs(recs[2]["tempo"] - 137.6) < 0.05
  cfg = {"dir": str(tmp_path / "au"), "global_batch_size": 5, "seed": 0, "clip_seconds": 1.0,
         "sample_rate": 16000, "log_mel_on_host": True}
  b = pipelines.build_train_dataset(cfg)[0][0]
  assert b["log_mel"].shape == (5, 1 + (16000 - 400) // 160, 64)
  assert np.isfinite(b["log_mel"]).all()
  order = np.argsort(b["index"])
  np.testing.assert_array_equal(b["tags"][order], [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0],
                                                   [0, 1, 0, 0], [0, 0, 1, 1]])


def test_audio_folder_bad_files(tmp_path):
  soundfile.write(tmp_path / "ok.wav", _sine(440, 8000, 0.5), 8000)
  (tmp_path / "bad.wav").write_bytes(b"RIFF" + b"\0" * 40)
  (tmp_path / "a.csv").write_text("path,key,tempo\nok.wav,A minor,120\nbad.wav,,\n")
  with pytest.raises(common.ConversionError, match=r"a\.csv:3, field 'path'.*decode failed"):
    convert_lib.convert("audio-folder", tmp_path / "a.csv", tmp_path / "o")
  meta = convert_lib.convert("audio-folder", tmp_path / "a.csv", tmp_path / "o",
                             skip_bad_records=True)
  assert meta["skipped"]["count"] == 1 and meta["splits"]["train"]["num_examples"] == 1
  (tmp_path / "b.csv").write_text("path,key\nok.wav,H major\n")
  with pytest.raises(common.ConversionError, match=r"b\.csv:2, field 'key'.*unknown tonic"):
    convert_lib.convert("audio-folder", tmp_path / "b.csv", tmp_path / "o2")
  cfg = {"dir": str(tmp_path / "o"), "global_batch_size": 1, "clip_seconds": 1.0,
         "sample_rate": 8000}
  b = pipelines.build_train_dataset(cfg)[0][0]
  assert b["audio"].shape == (1, 8000) and (b["audio"][0, 4000:] == 0).all()  # padded
  assert b["key"][0] == 21 and b["tempo"][0] == 120.0


def test_hetrec_lastfm(shared_data, tmp_path):
  meta = convert_lib.convert("lastfm-hetrec", shared_data / "hetrec2011-lastfm-2k",
                             tmp_path / "fm", cf_dim=8, tag_dim=8)
  # SOURCE.md: 17,632 artists; 12,523 tagged artists, 390 of them not in artists.dat.
  assert meta["num_entities"] == 17632 + 390
  assert meta["available"] == {"cf": 17632, "tags": 12523}
  assert meta["stats"]["num_tag_assignments"] == 186479
  assert meta["stats"]["num_play_counts"] == 92834 and meta["stats"]["num_users"] == 1892
  src = records.ArrayRecordSource(tmp_path / "fm", "entities")
  first = src[0]
  assert first["id"] == "1" and first["name"] == "MALICE MIZER"
  assert first["cf"].shape == (8,) and abs(np.linalg.norm(first["cf"]) - 1) < 1e-5
  last = src[len(src) - 1]
  assert last["name"] == "" and last["has_cf"] == 0 and last["has_tags"] == 1
  assert not last["cf"].any()


def test_lastfm_small_cf_groups_co_listened_artists(tmp_path):
  (tmp_path / "artists.dat").write_text("id\tname\turl\tpictureURL\n" +
                                        "".join(f"{a}\tA{a}\tu\tp\n" for a in range(1, 7)))
  (tmp_path / "tags.dat").write_bytes("tagID\ttagValue\r\n1\trock\r\n2\tjazz\r\n3\tnoël\r\n"
                                      .encode("latin-1"))
  plays = [(u, a, 50) for u in range(1, 6) for a in (1, 2, 3)]
  plays += [(u, a, 50) for u in range(6, 11) for a in (4, 5)]
  (tmp_path / "user_artists.dat").write_text("userID\tartistID\tweight\r\n" + "".join(
      f"{u}\t{a}\t{w}\r\n" for u, a, w in plays))
  # "rock" is given to artists 1 and 2 by many users: the dominant tag direction.
  tagged = [(u, a, 1) for a in (1, 2) for u in range(1, 11)] + [(3, 4, 2), (3, 6, 3)]
  (tmp_path / "user_taggedartists.dat").write_text(
      "userID\tartistID\ttagID\tday\tmonth\tyear\r\n"
      + "".join(f"{u}\t{a}\t{t}\t1\t1\t2009\r\n" for u, a, t in tagged))
  data = lastfm.read(tmp_path, cf_dim=2, tag_dim=2)
  cf, has_cf = data["modalities"]["cf"]
  assert has_cf.tolist() == [True] * 5 + [False]
  sim = cf @ cf.T
  assert sim[0, 1] > 0.99 and sim[3, 4] > 0.99 and abs(sim[0, 3]) < 0.01
  tags, has_tags = data["modalities"]["tags"]
  assert has_tags.tolist() == [True, True, False, True, False, True]
  assert tags[0] @ tags[1] > 0.99 and data["tag_names"]["3"] == "noël"
  with open(tmp_path / "user_taggedartists.dat", "a") as f:
    f.write("3\t6\t9\t1\t1\t2009\r\n")
  with pytest.raises(common.ConversionError, match=r"user_taggedartists\.dat:24, field 'tagID'"):
    lastfm.read(tmp_path, cf_dim=2, tag_dim=2)


def test_precomputed_embeddings(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.normal(size=(3, 4)).astype(np.float32)
  np.save(tmp_path / "image.npy", img)
  (tmp_path / "image.ids.txt").write_text("a\nb\nc\n")
  (tmp_path / "image.json").write_text(json.dumps({
      "format": "mmcl.embeddings/1", "count": 3, "dim": 4,
      "sha256": records.sha256_file(tmp_path / "image.npy"),
      "ids_sha256": records.sha256_file(tmp_path / "image.ids.txt")}))
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"id": ["c", "d"], "embedding": [[1.0, 2.0], [3.0, 4.0]]}),
                 tmp_path / "text.parquet")
  meta = convert_lib.convert("embeddings", f"{tmp_path / 'image.npy'},{tmp_path / 'text.parquet'}",
                             tmp_path / "o")
  assert meta["modalities"] == {"image": 4, "text": 2} and meta["num_entities"] == 4
  assert meta["available"] == {"image": 3, "text": 2}
  recs = records.ArrayRecordSource(tmp_path / "o", "entities").read_many(range(4))
  assert [r["id"] for r in recs] == ["a", "b", "c", "d"]
  np.testing.assert_array_equal(recs[2]["image"], img[2])
  np.testing.assert_array_equal(recs[2]["text"], [1.0, 2.0])
  assert recs[3]["has_image"] == 0 and not recs[3]["image"].any()
  b = pipelines.build_train_dataset({"dir": str(tmp_path / "o"), "global_batch_size": 4})[0][0]
  assert b["image"].shape == (4, 4) and b["has_text"].sum() == 2
  img[1, 2] = np.nan
  np.save(tmp_path / "image.npy", img)
  (tmp_path / "image.json").unlink()
  with pytest.raises(common.ConversionError, match=r"image\.npy \(row 1, id 'b'\).*non-finite"):
    convert_lib.convert("embeddings", tmp_path / "image.npy", tmp_path / "o2")
  pq.write_table(pa.table({"id": ["c", "d"], "embedding": [[1.0, 2.0], [3.0]]}),
                 tmp_path / "text.parquet")
  with pytest.raises(common.ConversionError, match=r"row 1, id 'd'.*length 1, expected 2"):
    convert_lib.convert("embeddings", tmp_path / "text.parquet", tmp_path / "o3")
  (tmp_path / "image.ids.txt").write_text("a\nb\na\n")
  with pytest.raises(common.ConversionError, match=r"row 2.*duplicate id 'a'"):
    convert_lib.convert("embeddings", tmp_path / "image.npy", tmp_path / "o4")


def test_float_kinds_refuse_non_finite():
  with pytest.raises(ValueError, match="reserved"):
    records.Field("v", "int")
  fields = (records.Field("vec", "float32_array", (2,)), records.Field("s", "float"))
  with pytest.raises(ValueError, match=r"field 'vec' holds non-finite"):
    records.encode_record({"vec": [1.0, np.inf], "s": 1.0}, fields, where="x")
  with pytest.raises(ValueError, match=r"field 'vec' expected float32 \[2\]"):
    records.encode_record({"vec": [1.0], "s": 1.0}, fields, where="x")
  with pytest.raises(ValueError, match=r"field 's' is nan"):
    records.encode_record({"vec": [1.0, 2.0], "s": float("nan")}, fields, where="x")
  raw = records.encode_record({"vec": [1.0, 2.0], "s": 3.5}, fields)
  out = records.decode_record(raw, fields, path="f", split="s", index=0, position=0)
  assert out["s"] == 3.5 and out["vec"].dtype == np.float32
