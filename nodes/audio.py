"""finetune/audio: sound as spectrogram pictures (Riffusion's route), so every trainer trains on sound unchanged.

AUDIO is ComfyUI's own type: ``{"waveform": float32 (B, C, T), "sample_rate": int}``; pictures are IMAGE. Both
conversion nodes must use the same preset (an IMAGE carries no metadata).
"""
from __future__ import annotations

from . import host
from .base import COMBO, INT, LINK, ROOT_CATEGORY, SEED, STRING, checked, torch_call
from .datasets import NO_FOLDER, OPTIONS, ShowsDataset, _apply_options, _folder_choices

CATEGORY = f"{ROOT_CATEGORY}/audio"
ANY_VALUE = "(not checked)"


def _names():
    from ..trainers.audio import names

    return names


def PRESET(tooltip: str = "") -> tuple:
    names = _names()
    return COMBO(list(names.PRESET_NAMES), "Spectrogram parameters. toy_8k_64mel: 8 kHz, 64 mel bins over 60-2000 Hz, "
                 "hop 128, 64 x 64 px = 1.024 s (the built-in toy audio model). riffusion_44k_512mel: Riffusion's own "
                 "(44.1 kHz, 512 HTK mel bins over 0-10 kHz, hop 10 ms, 512 x 512 px = 5.12 s) for a Riffusion "
                 "checkpoint loaded with Load Checkpoint. " + tooltip)


def _audio(audio) -> tuple:
    """The waveform (B, C, T) float32 and the rate of a ComfyUI AUDIO, checked."""
    import torch

    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError("audio: expected ComfyUI's AUDIO (a dict with 'waveform' and 'sample_rate'), e.g. from "
                         "Load Audio")
    w = torch.as_tensor(audio["waveform"]).detach().float().cpu()
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3 or w.shape[-1] == 0:
        raise ValueError(f"audio: the waveform must be (batch, channels, samples), got shape {tuple(w.shape)}")
    return w, int(audio["sample_rate"])


class FT_AudioToSpectrogram:
    DESCRIPTION = ("Sound to spectrogram pictures: one picture per window of the preset's length, the last padded "
                   "with silence (length keeps the true number of samples, for Spectrogram to Audio). Every clip of "
                   "an AUDIO batch is converted; the pictures come one clip after another.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("images", "length")
    OUTPUT_TOOLTIPS = ("Spectrogram pictures (N, H, W, 3), values 0..1: low notes at the bottom, time to the right.",
                       "The sound's length in samples at the preset's rate (of the first clip), for trimming.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": LINK("AUDIO", "The sound (from Load Audio, or any AUDIO)."),
            "preset": PRESET(),
            "channels": COMBO(list(_names().CHANNELS), "mono mix: the channels averaged; left / right: one channel; "
                              "stereo: mono in red, left in green, right in blue (Riffusion's convention)."),
        }}

    @torch_call
    def execute(self, audio, preset, channels):
        import torch

        from ..trainers.audio.spectrogram import to_pictures

        w, rate = _audio(audio)
        outs = [to_pictures(clip, rate, preset, channels) for clip in w]
        return (torch.cat([p for p, _ in outs]), int(outs[0][1]))


class FT_SpectrogramToAudio:
    DESCRIPTION = ("Spectrogram pictures back to sound: the mel bins to a linear spectrum, then Griffin-Lim finds a "
                   "phase (seeded, so the same pictures and seed give the same sound). Windows are joined with a "
                   "short crossfade, without clicks. Griffin-Lim sounds a little phasey on real music: fine for "
                   "tones, speech-like textures and previews.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    OUTPUT_TOOLTIPS = ("ComfyUI AUDIO at the preset's sample rate: connect Preview Audio or Save Audio.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": LINK("IMAGE", "Spectrogram pictures (from Sample, KSampler + VAE Decode, or Audio to "
                           "Spectrogram)."),
            "preset": PRESET("Use the preset the pictures were made with."),
            "iterations": INT(32, 1, 1000, "Griffin-Lim iterations: more is cleaner and slower (32 is Riffusion's)."),
            "seed": SEED("Seed of Griffin-Lim's starting phase."),
            "join": COMBO(list(_names().JOINS), "concatenate: all pictures one after another as one sound (a long "
                          "clip cut into windows); batch: one sound per picture (several generations)."),
        }, "optional": {
            "length": INT(0, 0, 2 ** 31 - 1, "Trim the joined sound to this many samples (Audio to Spectrogram's "
                          "length); 0 = keep every window whole."),
        }}

    @torch_call
    def execute(self, images, preset, iterations, seed, join, length=0):
        from ..trainers.audio.spectrogram import get_preset, to_audio

        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"images: expected an IMAGE batch (N, H, W, 3), got shape {tuple(images.shape)}")
        out = to_audio(images[..., :3].float().cpu(), preset, iterations=iterations, seed=seed, join=join,
                       length=length or None)
        return ({"waveform": (out[None] if out.ndim == 2 else out).float().contiguous(),
                 "sample_rate": int(get_preset(preset).sample_rate)},)


class FT_LoadAudioDataset(ShowsDataset):
    DESCRIPTION = ("Load a folder of sound files from ComfyUI's input folder as a training dataset of spectrogram "
                   "pictures: wav (always), flac, mp3, ogg, opus, m4a (with PyAV, which ComfyUI installs). Each "
                   "file is cut into windows of the preset's length, one picture each. Captions come from name.txt "
                   "beside name.wav, or the caption input; unreadable files are skipped and named in a warning.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The spectrogram pictures with their captions: connect any training node.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": COMBO(_folder_choices(), "A subfolder of ComfyUI's input folder holding the sound files "
                                "(put them there, then refresh)."),
                "preset": PRESET(),
                "caption": STRING("a {token} sound", "Caption for files without a .txt caption; {token} is "
                                  "replaced by the token input."),
                "token": STRING("sks", "The word that stands for your sound in captions."),
                "channels": COMBO(list(_names().CHANNELS), "Which channels make the pictures."),
            },
            "optional": dict(OPTIONS),
        }

    @checked
    def execute(self, folder, preset, caption, token, channels, **options):
        from ..trainers.audio.dataset import load_audio_folder
        from ..trainers.data.names import find_nfc

        if folder == NO_FOLDER:
            raise ValueError("folder: there is no subfolder in ComfyUI's input folder; put your sound files in "
                             "input/<name>/ and refresh the page")
        host.inside(host.input_dir(), folder, "folder")
        path = host.inside(host.input_dir(), find_nfc(host.input_dir(), folder), "folder")
        ds = load_audio_folder(path, preset, caption, token, channels, options.get("repeats", 1))
        return (_apply_options(ds, options),)


class FT_DatasetFromAudio(ShowsDataset):
    DESCRIPTION = ("Make a training dataset from an AUDIO made or loaded in the graph (e.g. Load Audio): every "
                   "window of every clip becomes a spectrogram picture with the clip's caption.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The spectrogram pictures with their captions.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": LINK("AUDIO", "The sound (a batch of clips)."),
            "captions": STRING("a sks tone", "One caption for every clip, or one line per clip.", multiline=True),
            "preset": PRESET(),
            "channels": COMBO(list(_names().CHANNELS), "Which channels make the pictures."),
        }, "optional": dict(OPTIONS)}

    @torch_call
    def execute(self, audio, captions, preset, channels, **options):
        from ..trainers.audio.dataset import from_audio

        w, rate = _audio(audio)
        lines = [ln for ln in str(captions).splitlines() if ln.strip()] or [""]
        return (_apply_options(from_audio(w.numpy(), rate, lines, preset, channels), options),)


class FT_ToyAudioDataset(ShowsDataset):
    DESCRIPTION = ("Sounds from the built-in toy sound world, for trying training on sound without any files: a "
                   "note, a timbre and a rhythm, each clip 1.024 s at 8 kHz as a toy_8k_64mel picture. The note e and "
                   "the timbre pluck were never played to the toy audio model: they are what fine-tuning teaches.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_DATASET", "IMAGE", "AUDIO")
    RETURN_NAMES = ("dataset", "images", "audio")
    OUTPUT_TOOLTIPS = ("The spectrogram pictures with the caption.", "The same pictures as an IMAGE batch.",
                       "The clips themselves, one after another (to listen to).")

    @classmethod
    def INPUT_TYPES(cls):
        n = _names()
        return {"required": {
            "note": COMBO(list(n.NOTES) + [n.ANY], "The note (e was never played to the toy audio model); any = a "
                          "random base note per clip.", n.NEW_NOTES[0]),
            "timbre": COMBO(list(n.TIMBRES) + [n.ANY], "The timbre (pluck was never played to it).", "sine"),
            "rhythm": COMBO(list(n.RHYTHMS) + [n.ANY], "Held steady, or pulsing twice / four times a second.",
                            "steady"),
            "count": INT(8, 1, 4096, "How many clips."),
            "caption": STRING("a sks tone", "The caption of every clip; {note}, {timbre} and {rhythm} are replaced "
                              "by the clip's own (e.g. 'a {timbre} tone at {note}')."),
            "seed": INT(0, 0, 2 ** 31 - 1, "Seed of the clips' small variations (phase, loudness, detune)."),
        }, "optional": dict(OPTIONS)}

    @torch_call
    def execute(self, note, timbre, rhythm, count, caption, seed, **options):
        import numpy as np
        import torch

        from ..trainers.audio.dataset import toy_clips, toy_dataset
        from ..trainers.audio.world import SAMPLE_RATE

        any_ = _names().ANY
        pick = [None if v == any_ else v for v in (note, timbre, rhythm)]
        clips = toy_clips(*pick, count, caption, seed)
        tag = "-".join("any" if v is None else v.replace(" ", "") for v in pick)
        ds = toy_dataset(clips, f"toy-sound-{tag}", f"toy sound world seed {seed}")
        imgs = torch.from_numpy(np.stack([e.image for e in ds.examples]).astype(np.float32) / 255)
        wave = torch.from_numpy(np.concatenate([c.wave for c in clips]))[None, None]
        return (_apply_options(ds, options), imgs, {"waveform": wave, "sample_rate": SAMPLE_RATE})


class FT_JudgeAudio:
    DESCRIPTION = ("Measure sounds of the toy sound world, with no learned model: the pitch by a YIN estimator "
                   "(named as the nearest toy note, with its cents), the timbre by the harmonics' levels, the rhythm "
                   "by the loudness envelope's pulses. Each clip of the batch is judged; the accuracies count the "
                   "clips that match the expected values.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("report", "note_acc", "timbre_acc", "rhythm_acc", "median_cents")
    OUTPUT_TOOLTIPS = ("What was heard in each clip, and the totals.",
                       "Share of clips whose note is the expected one (-1 when not checked).",
                       "Share of clips whose timbre is the expected one (-1 when not checked).",
                       "Share of clips whose rhythm is the expected one (-1 when not checked).",
                       "Median distance in cents of the voiced clips' pitch from the expected (or nearest) note; -1 "
                       "when no clip has a pitch.")
    FUNCTION = "execute"
    OUTPUT_NODE = True
    SHOWS = ("text",)  # room the example layouts leave for it (workflows.py)

    @classmethod
    def INPUT_TYPES(cls):
        n = _names()
        return {"required": {
            "audio": LINK("AUDIO", "The sounds: a batch of clips, each judged alone."),
            "note": COMBO([ANY_VALUE] + list(n.NOTES), "The note each clip should play.", n.NEW_NOTES[0]),
            "timbre": COMBO([ANY_VALUE] + list(n.TIMBRES), "The timbre each clip should have."),
            "rhythm": COMBO([ANY_VALUE] + list(n.RHYTHMS), "The rhythm each clip should have."),
        }}

    @checked
    def execute(self, audio, note, timbre, rhythm):
        from ..trainers.audio.judge import judge_many

        w, rate = _audio(audio)
        want = [None if v == ANY_VALUE else v for v in (note, timbre, rhythm)]
        res = judge_many([clip.numpy() for clip in w], rate, *want)
        lines = [f"clip {i + 1}: note {v.note} ({v.cents:+.0f} cents), {v.timbre}, {v.rhythm}"
                 for i, v in enumerate(res["verdicts"][:32])]
        accs = [res[f"{k}_acc"] for k in ("note", "timbre", "rhythm")]
        lines.append(" | ".join(f"{k} {a:.0%}" for k, a in zip(("note", "timbre", "rhythm"), accs) if a is not None)
                     or "nothing expected: see each clip")
        cents = res["median_abs_cents"]
        text = "\n".join(lines)
        return {"ui": {"text": [text]},
                "result": (text, *[-1.0 if a is None else float(a) for a in accs],
                           -1.0 if cents is None else float(cents))}
