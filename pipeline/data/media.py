"""Media I/O with PyAV: probing containers (metadata only) and decoding.

PyAV bundles FFmpeg's libraries, so no ffmpeg binary is needed. Probing reads
container and stream headers only — never a full decode — so `prepare` stays
fast on large corpora; `scan_tracks` then reads every packet once (decoding audio
only) to find files cut short and silent tracks; a clip that passes both but
fails mid-decode is caught per clip by the feature stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".flv")
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class MediaError(Exception):
    """A media file that cannot be used; the message is the one-line reject reason."""


class NoVideoStream(MediaError):
    """A container without a video stream (it may still hold audio)."""


@dataclass
class VideoInfo:
    duration: float          # seconds
    fps: float
    width: int
    height: int
    has_audio: bool
    audio_sample_rate: int   # 0 when there is no audio track
    audio_channels: int


@dataclass
class AudioInfo:
    duration: float
    sample_rate: int
    channels: int


def _stream_duration(stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def _channels(codec_context) -> int:
    layout = getattr(codec_context, "layout", None)
    if layout is not None and getattr(layout, "nb_channels", 0):
        return int(layout.nb_channels)
    return int(getattr(codec_context, "channels", 0) or 0)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError("missing media file")
    if path.stat().st_size == 0:
        raise MediaError("zero-length media file")
    return path


def _open(path: str | Path):
    path = _existing(path)
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        with open(path, "rb") as f:
            head = f.read(12)
        # An ISO-BMFF signature that fails to open is a cut-off file: mp4 writers put the
        # index (moov) last, so a truncated download or copy loses it.
        if head[4:8] == b"ftyp":
            raise MediaError(f"truncated or corrupt mp4 container ({err.__class__.__name__})") from None
        raise MediaError(f"unreadable media file, not a known container ({err.__class__.__name__})") from None


def probe_video(path: str | Path) -> VideoInfo:
    """Container metadata of a video clip; raises MediaError with a one-line reason."""
    with _open(path) as container:
        if not container.streams.video:
            raise NoVideoStream("no video stream")
        video = container.streams.video[0]
        ctx = video.codec_context
        if not ctx.width or not ctx.height:
            raise MediaError("video stream has no frame size (truncated or corrupt header)")
        fps = float(video.average_rate or video.guessed_rate or 0)
        duration = _stream_duration(video)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        if not duration or duration <= 0:
            raise MediaError("video has zero duration")
        if fps <= 0:
            raise MediaError("video has no frame rate")
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            duration=float(duration), fps=fps, width=int(ctx.width), height=int(ctx.height),
            has_audio=audio is not None,
            audio_sample_rate=int(audio.codec_context.sample_rate or 0) if audio else 0,
            audio_channels=_channels(audio.codec_context) if audio else 0,
        )


def probe_audio(path: str | Path) -> AudioInfo:
    """Container metadata of an audio file (wav, flac, ...)."""
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        audio = container.streams.audio[0]
        duration = _stream_duration(audio)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        if not duration or duration <= 0:
            raise MediaError("audio has zero duration")
        return AudioInfo(float(duration), int(audio.codec_context.sample_rate or 0), _channels(audio.codec_context))


@dataclass
class TrackScan:
    """One pass over a file's packets: where each stream's readable data ends, and its audio decoded."""
    video_end: float | None     # s, end of the last readable video packet (None: no video stream)
    video_duration: float       # s, as the header says
    audio_end: float | None     # s, end of the last readable audio packet (None: no audio stream)
    audio_duration: float
    audio_samples: int          # decoded, per channel
    audio_rate: int
    audio_peak: float           # peak |sample|, full scale = 1
    audio_error: str            # the first audio decode error that is not a cut ('' when none)

    def truncation(self) -> str | None:
        """'truncated media (...)' when a stream's data ends before its header says, else None."""
        cut = [end is not None and duration > 0 and end < duration - max(TRUNCATION_SLACK_S, 0.02 * duration)
               for end, duration in ((self.video_end, self.video_duration), (self.audio_end, self.audio_duration))]
        if not any(cut):
            return None
        parts = [f"video ends at {self.video_end:.2f} s of {self.video_duration:.2f} s"] if self.video_end is not None else []
        if self.audio_end is not None:
            parts.append(f"audio decodes to {self.audio_samples} of {round(self.audio_duration * self.audio_rate)} samples")
        return f"truncated media ({'; '.join(parts)})"


TRUNCATION_SLACK_S = 0.1  # a stream ending this much (or 2%) before its header's duration was cut off


def scan_tracks(path: str | Path, decode_audio: bool = True) -> TrackScan:
    """Read every packet of a file once: the video is demuxed only, the audio decoded (when asked).

    A file cut short (an interrupted download or copy of an mp4 whose index comes first) still
    opens and probes fine, but its streams end early: that is told apart here from a silent
    track and from a corrupt one, at the cost of one read of the file (as hashing it costs).
    """
    import numpy as np

    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        ends = {s.index: 0.0 for s in (video, audio) if s is not None}
        samples, peak, error = 0, 0.0, ""

        def take(frames):
            nonlocal samples, peak
            for frame in frames:
                x = frame.to_ndarray()
                if np.issubdtype(x.dtype, np.integer):
                    x = x / np.iinfo(x.dtype).max
                peak = max(peak, float(np.abs(x).max(initial=0.0)))
                samples += frame.samples

        try:
            for packet in container.demux(*(s for s in (video, audio) if s is not None)):
                if packet.size == 0 or packet.pts is None:
                    continue
                stream = packet.stream
                start = stream.start_time or 0
                ends[stream.index] = max(ends[stream.index],
                                         float((packet.pts - start + (packet.duration or 0)) * packet.time_base))
                if stream is audio and decode_audio and not error:
                    try:
                        take(packet.decode())
                    except av.error.FFmpegError as err:
                        error = err.__class__.__name__
            if audio is not None and decode_audio and not error:
                take(audio.decode(None))  # the decoder's delayed frames
        except av.error.FFmpegError:
            pass  # the container's data ends here: what was read is what the file holds

        def duration(stream):
            return _stream_duration(stream) or (container.duration or 0) / av.time_base

        return TrackScan(
            video_end=ends[video.index] if video is not None else None,
            video_duration=duration(video) if video is not None else 0.0,
            audio_end=ends[audio.index] if audio is not None else None,
            audio_duration=duration(audio) if audio is not None else 0.0,
            audio_samples=samples, audio_rate=int(audio.codec_context.sample_rate or 0) if audio is not None else 0,
            audio_peak=peak, audio_error=error)


def probe_image(path: str | Path) -> tuple[int, int]:
    """(width, height) of a still image, read from its header."""
    from PIL import Image, UnidentifiedImageError

    path = _existing(path)
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as err:
        raise MediaError(f"unreadable image ({err})") from None


# --------------------------------------------------------------------------- decoding
# The feature stages decode each clip exactly once, front to back: seeking per
# sampled frame costs a keyframe-to-target decode every time, which on long-GOP
# H.264 is slower than just decoding everything sequentially.

def sample_times(duration: float, fps: float, max_frames: int = 0) -> "np.ndarray":
    """Target timestamps: the centres of 1/fps intervals, spread evenly when over max_frames.

    n = max(1, round(duration * fps)) frames, so sequence lengths follow duration and fps;
    a clip longer than max_frames / fps keeps max_frames frames across its whole length.
    """
    import numpy as np

    n = max(1, int(round(duration * fps)))
    if max_frames and n > max_frames:
        return (np.arange(max_frames) + 0.5) * (duration / max_frames)
    return (np.arange(n) + 0.5) / fps


def _scaled_size(width: int, height: int, max_short: int) -> tuple[int, int]:
    short = min(width, height)
    if not max_short or short <= max_short:
        return width, height
    s = max_short / short
    return max(2, int(round(width * s / 2)) * 2), max(2, int(round(height * s / 2)) * 2)


def iter_video_frames(path: str | Path, fps: float, max_frames: int = 0, *, duration: float | None = None,
                      max_short: int = 0, threads: int = 0):
    """Yield (timestamp_s, rgb uint8 HxWx3) for frames sampled at `fps`, in one sequential decode.

    For each target time the frame on screen at that moment is taken (the last frame
    starting at or before it). Only sampled frames are converted to RGB, scaled in
    swscale so their short side is at most `max_short` (0 = native). `threads` sets
    FFmpeg's decoder threads (0 = FFmpeg's choice). A decode error after the probe
    raises MediaError saying how far decoding got.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        if duration is None:
            duration = _stream_duration(stream) or (container.duration or 0) / av.time_base
        rate = float(stream.average_rate or stream.guessed_rate or 25.0)
        targets = sample_times(float(duration), fps, max_frames)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        size = _scaled_size(stream.codec_context.width, stream.codec_context.height, max_short)

        def rgb(frame):
            return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])

        k, n_decoded, t = 0, 0, 0.0
        prev = None  # [time, av frame, rgb or None]: the frame on screen until the current one
        try:
            for frame in container.decode(stream):
                t = (float(frame.time) - start) if frame.time is not None else n_decoded / rate
                n_decoded += 1
                current = [t, frame, None]
                while k < len(targets) and targets[k] < t:
                    shown = prev or current  # a target before the first frame gets the first frame
                    if shown[2] is None:
                        shown[2] = rgb(shown[1])
                    yield shown[0], shown[2]
                    k += 1
                if k == len(targets):
                    return  # every target served: the rest of the clip is never decoded
                prev = current
        except av.error.FFmpegError as err:
            raise MediaError(f"decode failed after {n_decoded} frames ({t:.2f} s): {err}") from None
        if n_decoded == 0:
            raise MediaError("no frame could be decoded")
        end = t + 1.0 / rate
        if k < len(targets) and end < duration - max(0.5, 0.1 * duration):
            raise MediaError(f"video stream ends at {end:.2f} s of the {duration:.2f} s probed (truncated file?)")
        # the remaining targets fall in the last frame's display time or the container's slack after it
        while k < len(targets):
            if prev[2] is None:
                prev[2] = rgb(prev[1])
            yield prev[0], prev[2]
            k += 1


def read_audio(path: str | Path, sample_rate: int) -> "np.ndarray":
    """Decode the first audio stream of a file (video or audio) to mono float32 at sample_rate.

    FFmpeg's resampler (via PyAV) does the downmix and resampling while decoding.
    """
    import numpy as np

    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=int(sample_rate))
        chunks, n_decoded = [], 0
        try:
            for frame in container.decode(stream):
                n_decoded += 1
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):  # flush the resampler's tail
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as err:
            raise MediaError(f"audio decode failed after {n_decoded} frames: {err}") from None
        if not chunks:
            raise MediaError("no audio could be decoded")
        return np.concatenate(chunks).astype(np.float32, copy=False)


def read_image(path: str | Path) -> "np.ndarray":
    """A still image as RGB uint8 HxWx3."""
    import cv2

    path = Path(path)
    if not path.exists():
        raise MediaError("missing media file")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise MediaError("unreadable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
