"""Offline speech synthesis with eSpeak NG from the ``espeakng-loader`` wheel (libespeak-ng and its
voice data ship inside it: ``pip install --no-deps espeakng-loader==0.2.4``), through ctypes.

    wav, rate = synthesize("a red dog", voice="en-us+m3", words_per_minute=160, pitch=50)

Returns a float32 mono waveform in [-1, 1] at eSpeak's rate (22050 Hz). Used to make the audio demo's
spoken data; nothing is downloaded. One process-wide engine (eSpeak NG is not re-entrant)."""

from __future__ import annotations

import ctypes
import threading

import numpy as np

AUDIO_OUTPUT_RETRIEVAL = 1  # synthesized audio goes to the callback, not a sound device
espeakCHARS_UTF8 = 1
espeakRATE, espeakPITCH = 1, 3  # espeak_PARAMETER
EE_OK = 0
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_lock = threading.Lock()
_engine: dict = {}


def _lib():
    """libespeak-ng, initialised once -> (library, sample rate)."""
    if not _engine:
        try:
            import espeakng_loader
        except ImportError:
            raise RuntimeError(
                "speech synthesis needs eSpeak NG: pip install --no-deps espeakng-loader==0.2.4"
            ) from None
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_RETRIEVAL, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data at {espeakng_loader.get_data_path()}")
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0:
                chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        cb = _CALLBACK(collect)
        lib.espeak_SetSynthCallback(cb)
        _engine.update(lib=lib, rate=rate, chunks=chunks, cb=cb)  # keep the callback alive
    return _engine["lib"], _engine["rate"]


def synthesize(text: str, voice: str = "en-us", words_per_minute: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """``text`` spoken by eSpeak NG -> (float32 waveform, sample rate). ``voice``: a language with an
    optional variant (``en-us+f2``, ``en+m3``); ``words_per_minute`` 80-450; ``pitch`` 0-100."""
    with _lock:
        lib, rate = _lib()
        chunks = _engine["chunks"]
        chunks.clear()
        if lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(espeakRATE, int(words_per_minute), 0)
        lib.espeak_SetParameter(espeakPITCH, int(pitch), 0)
        data = text.encode() + b"\0"
        err = lib.espeak_Synth(data, len(data), 0, 0, 0, espeakCHARS_UTF8, None, None)
        if err != EE_OK:
            raise RuntimeError(f"espeak_Synth failed ({err}) on {text!r}")
        lib.espeak_Synchronize()
        wav = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return (wav.astype(np.float32) / 32768.0), rate
