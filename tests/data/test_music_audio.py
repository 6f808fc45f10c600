"""LOEV's audio side: librosa parity of the log-mel front end, tracked augmentations, the
procedural music set's labels."""
import numpy as np
import pytest

from data_pipelines import audio_augment
from data_pipelines.recipes import music_synth

librosa = pytest.importorskip("librosa")


def _peak_hz(x: np.ndarray, sr: int) -> float:
  spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
  return float(np.fft.rfftfreq(x.size, 1 / sr)[np.argmax(spec)])


def test_log_mel_matches_librosa():
  import jax.numpy as jnp
  from mmcl.models.audio_cnn import LogMelFrontend, slaney_mel_filterbank
  fb = slaney_mel_filterbank(16000, 2048, 96, 0.0, 8000.0)
  ref_fb = librosa.filters.mel(sr=16000, n_fft=2048, n_mels=96, fmin=0.0, fmax=8000.0)
  np.testing.assert_allclose(fb, ref_fb, rtol=1e-5, atol=1e-9)
  wave, _, _ = music_synth.MusicSet(num_clips=2, seconds=1.0).clip(1)
  mel = librosa.feature.melspectrogram(y=wave.astype(np.float64), sr=16000, n_fft=2048,
                                       win_length=400, hop_length=160, n_mels=96, fmin=0.0,
                                       fmax=8000.0)
  ref = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80.0).T  # [frames, mels]
  ours = np.asarray(LogMelFrontend()(jnp.asarray(wave[None])))[0]
  assert ours.shape == ref.shape == (101, 96)
  # 1e-4 relative to the spectrogram's range (dB values cross zero, so not element-wise).
  assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))
  # And the mel energies themselves, element-wise where they are above the 80 dB floor.
  power = 10 ** (ours / 10)
  live = ref > ref.max() - 60
  np.testing.assert_allclose(power[live], mel.T[live], rtol=1e-4)


def test_pitch_shift_and_stretch_are_tracked():
  sr = 16000
  t = np.arange(int(1.4 * sr)) / sr
  tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
  cfg = audio_augment.AugmentConfig(out_samples=sr, chain_p=1.0, aug_p=1.0, base_chain=False)
  view, applied, params = audio_augment.augment_view(tone, cfg, np.random.default_rng(3))
  assert applied.tolist() == [True, True]
  semis, rate = params
  assert semis == int(semis) and 1 <= abs(semis) <= 4 and 0.7 <= rate <= 1.3
  # The tone moved by the recorded semitones (time stretch keeps pitch).
  assert _peak_hz(view[2000:-2000], sr) == pytest.approx(440.0 * 2 ** (semis / 12), rel=0.02)
  n_out = librosa.effects.time_stretch(tone, rate=1.25).size
  assert n_out == pytest.approx(tone.size / 1.25, rel=0.01)
  # Nothing applied: neutral parameters; same generator → same view.
  none = audio_augment.AugmentConfig(out_samples=sr, chain_p=0.0)
  v1, a1, p1 = audio_augment.augment_view(tone, none, np.random.default_rng(5))
  v2, _, _ = audio_augment.augment_view(tone, none, np.random.default_rng(5))
  assert not a1.any() and p1.tolist() == [0.0, 1.0]
  np.testing.assert_array_equal(v1, v2)
  assert np.abs(v1).max() <= 1.0


@pytest.mark.parametrize("res_type", ["soxr_hq", "soxr_mq", "fft"])
def test_pitch_shift_resamplers_move_a_tone_exactly(res_type):
  sr = 16000
  t = np.arange(sr) / sr
  tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
  cfg = audio_augment.AugmentConfig(out_samples=sr, res_type=res_type)
  for n in (-4, 3):
    view = audio_augment.fixed_view(tone, cfg, semitones=n)[2000:-2000]
    # Zero-padded FFT: 0.17 Hz bins, well inside the 0.5% (≥ 1.7 Hz) tolerance.
    spec = np.abs(np.fft.rfft(view * np.hanning(view.size), 8 * view.size))
    peak = float(np.fft.rfftfreq(8 * view.size, 1 / sr)[np.argmax(spec)])
    assert peak == pytest.approx(440.0 * 2 ** (n / 12), rel=0.005), (res_type, n)
  with pytest.raises(ValueError, match="res_type"):
    audio_augment.AugmentConfig(res_type="polyphase")


def test_view_bank_batches_are_banked_views(tmp_path):
  music = music_synth.MusicSet(num_clips=8, seconds=0.7, seed=2)
  music_synth.render(music, tmp_path / "set")
  cfg = audio_augment.AugmentConfig(out_samples=8000, chain_p=1.0)
  music_synth.render_view_bank(tmp_path / "set", tmp_path / "bank", augment=cfg,
                               views_per_clip=3, seed=5)
  views = np.load(tmp_path / "bank" / "views.npy")
  applied = np.load(tmp_path / "bank" / "applied.npy")
  params = np.load(tmp_path / "bank" / "params.npy")
  assert views.shape == (8, 3, 8000) and applied.shape == params.shape == (8, 3, 2)
  # A banked view is the documented draw of augment_view, stored as 16-bit PCM.
  wave = music.clip(6)[0]
  wave = np.round(wave * 32767).astype(np.int16).astype(np.float32) / 32767.0
  ref, ref_a, ref_p = audio_augment.augment_view(
      wave, cfg, np.random.default_rng([5, 2 ** 20 + 1, 6]))
  np.testing.assert_allclose(views[6, 1] / 32767.0, ref, atol=1 / 32767)
  assert applied[6, 1].tolist() == ref_a.tolist() and params[6, 1].tolist() == ref_p.tolist()
  it = music_synth.train_iterator(tmp_path / "set", global_batch_size=4, seed=5, augment=cfg,
                                  view_bank=str(tmp_path / "bank"))
  for _ in range(3):
    b = next(it)
    assert b["audio"].shape == (4, 2, 8000)
    for r, i in enumerate(b["index"]):
      # Each view is one of the clip's banked views, with its flags and parameters; two distinct.
      js = [int(np.argmin(np.abs(views[i] / 32767.0 - b["audio"][r, v]).max(-1))) for v in (0, 1)]
      assert js[0] != js[1]
      for v, j in enumerate(js):
        np.testing.assert_allclose(b["audio"][r, v], views[i, j] / 32767.0, atol=1e-7)
        assert b["applied"][r, v].tolist() == applied[i, j].tolist()
        np.testing.assert_array_equal(b["params"][r, v], params[i, j])
  # Re-rendering the same bank is a no-op; a bank too small for the set is refused.
  stamp = (tmp_path / "bank" / "views.npy").stat().st_mtime_ns
  music_synth.render_view_bank(tmp_path / "set", tmp_path / "bank", augment=cfg,
                               views_per_clip=3, seed=5)
  assert (tmp_path / "bank" / "views.npy").stat().st_mtime_ns == stamp
  with pytest.raises(ValueError, match="does not fit"):
    music_synth.train_iterator(tmp_path / "set", global_batch_size=4, seed=5, augment=cfg,
                               num_views=4, view_bank=str(tmp_path / "bank"))


def test_builders_side_by_side_take_turns(tmp_path):
  # Two builders of one bank at once (e.g. two runs of a sweep started together): each gets the
  # complete bank, it is built once, and no temporary file is left. Threads stand in for processes:
  # each opens the lock file itself, so flock serialises them as it does processes.
  import threading  # pylint: disable=g-import-not-at-top
  from data_pipelines import locks  # pylint: disable=g-import-not-at-top
  music = music_synth.MusicSet(num_clips=4, seconds=0.7, seed=3)
  cfg = audio_augment.AugmentConfig(out_samples=8000, chain_p=1.0)
  builds, errors = [], []
  real = music_synth._render_view_bank_locked  # pylint: disable=protected-access

  def counting(*args, **kw):
    builds.append(1)
    return real(*args, **kw)

  def build():
    try:
      music_synth.render(music, tmp_path / "set")
      music_synth.render_view_bank(tmp_path / "set", tmp_path / "bank", augment=cfg,
                                   views_per_clip=2, seed=1)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  music_synth._render_view_bank_locked = counting  # pylint: disable=protected-access
  try:
    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    music_synth._render_view_bank_locked = real  # pylint: disable=protected-access
  assert not errors, errors
  assert len(builds) == 1
  assert np.load(tmp_path / "bank" / "views.npy").shape == (4, 2, 8000)
  assert not list((tmp_path / "bank").glob("*.tmp"))
  # The lock itself: a second holder waits until the first lets go.
  order = []
  with locks.build_lock(tmp_path / "bank"):

    def second():
      with locks.build_lock(tmp_path / "bank"):
        order.append("second")

    waiter = threading.Thread(target=second)
    waiter.start()
    waiter.join(timeout=0.5)
    order.append("first")
  waiter.join(timeout=10)
  assert order == ["first", "second"]


def test_flags_follow_probabilities():
  cfg = audio_augment.AugmentConfig(out_samples=4000, base_chain=False)
  wave = np.random.default_rng(0).normal(size=6000).astype(np.float32) * 0.1
  flags = np.stack([audio_augment.augment_view(wave, cfg, np.random.default_rng(i))[1]
                    for i in range(120)])
  # Each tracked augmentation: p = chain_p · aug_p = 0.375.
  assert np.all(np.abs(flags.mean(0) - 0.375) < 0.13)


def test_music_labels_are_exact():
  music = music_synth.MusicSet(num_clips=6, seconds=2.0, seed=3)
  keys, bpms = music.labels()
  ratios = []
  for i in range(6):
    wave, key, bpm = music.clip(i)
    assert key == keys[i] and bpm == pytest.approx(bpms[i])
    # Every note is in the key's scale: its 7 pitch classes hold more chroma energy than the other
    # 5 (not all of it: percussion and upper harmonics such as the 5th, a major third up, leak).
    chroma = librosa.feature.chroma_stft(y=wave, sr=16000, n_fft=4096).sum(1)
    scale = (np.asarray(music_synth.MINOR if key >= 12 else music_synth.MAJOR) + key % 12) % 12
    ratios.append(chroma[scale].mean() / np.delete(chroma, scale).mean())
  assert min(ratios) > 1.3 and np.mean(ratios) > 1.8
  assert music_synth.transpose_key(np.array([0, 23, 14]), np.array([3, 2, -4])).tolist() == \
      [3, 13, 22]  # C→D# major, B minor +2 → C# minor, D minor −4 → A# minor


def test_real_fixture_clips_load(shared_data):
  clips = music_synth.load_mirdata_fixtures(shared_data / "mirdata-audio-fixtures")
  by_name = {c["name"].split("/")[0]: c for c in clips}
  assert by_name["giantsteps_key"]["key"] == 2  # D major
  assert by_name["beatport_key"]["key"] == 14  # D minor
  assert any(c["bpm"] == pytest.approx(85.53) for c in clips)
