"""Check an SDP offer before any session is made: what it must send and receive for its endpoint, in codecs
we decode and encode. aiortc itself answers such offers silently with codecs the peer never offered, so the
refusal (and its reason) has to come from here.

The page (`/ws`, `POST /offer`): audio (its microphone, or recvonly for a kiosk without one) and video it
can receive. WHIP (`POST /whip`): audio it sends; its video is declined. WHEP (`.../whep`): audio and
video it receives.
"""
from __future__ import annotations

from aiortc.codecs import CODECS
from aiortc.sdp import MediaDescription, SessionDescription

SUPPORTED_AUDIO = sorted({c.mimeType.split("/", 1)[1].lower() for c in CODECS["audio"]})
SUPPORTED_VIDEO = sorted({c.mimeType.split("/", 1)[1].lower() for c in CODECS["video"]} - {"rtx"})
SENDING = ("sendrecv", "sendonly")
RECEIVING = ("sendrecv", "recvonly")


class OfferSdpError(ValueError):
    """The offer cannot carry a session; the message says what is missing and what to send."""


def _parse(sdp: str) -> SessionDescription:
    try:
        return SessionDescription.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - the parser raises anything from ValueError to AssertionError
        raise OfferSdpError(f"the offer's SDP could not be parsed ({type(exc).__name__}: {exc}); send the "
                            "SDP from RTCPeerConnection.createOffer() unchanged") from None


def _media(parsed: SessionDescription, kind: str, directions: tuple[str, ...]) -> list[MediaDescription]:
    return [m for m in parsed.media if m.kind == kind and (m.direction or "sendrecv") in directions and m.port != 0]


def _check_codecs(media: list[MediaDescription], kind: str, supported: list[str]) -> None:
    for m in media:
        offered = sorted({codec.mimeType.split("/", 1)[1].lower() for codec in m.rtp.codecs} - {"rtx"})
        if not set(offered) & set(supported):
            raise OfferSdpError(f"the offer's {kind} codecs {offered or ['none']} are not supported; offer one "
                                f"of {supported}" + (" (browsers offer opus by default)" if kind == "audio" else ""))


def offer_sends_audio(sdp: str) -> bool:
    """True when the offer sends audio (a microphone, a WHIP encoder)."""
    return bool(_media(_parse(sdp), "audio", SENDING))


def check_offer_sdp(sdp: str, needs_mic: bool = False, needs_video_out: bool = True) -> None:
    """Raise OfferSdpError unless the offer has audio (sent when `needs_mic`) and, if `needs_video_out`,
    receives video, in codecs we support."""
    parsed = _parse(sdp)
    audio = _media(parsed, "audio", SENDING + RECEIVING + ("inactive",))
    if not audio:
        raise OfferSdpError("the offer has no audio track; add the microphone (addTrack with the getUserMedia "
                            "audio track before createOffer), or a recvonly audio transceiver for a kiosk "
                            "without one")
    sending_audio = _media(parsed, "audio", SENDING)
    if needs_mic and not sending_audio:
        raise OfferSdpError("the offer sends no audio; this endpoint is driven by the audio you send "
                            "(add an audio track before createOffer)")
    _check_codecs(audio, "audio", SUPPORTED_AUDIO)
    if needs_video_out:
        receiving_video = _media(parsed, "video", RECEIVING)
        if not receiving_video:
            raise OfferSdpError("the offer cannot receive video; add a recvonly video transceiver "
                                "(pc.addTransceiver('video', {direction: 'recvonly'}))")
        _check_codecs(receiving_video, "video", SUPPORTED_VIDEO)


def check_viewer_sdp(sdp: str) -> None:
    """A WHEP viewer's offer: it must receive audio and video, in codecs we encode."""
    parsed = _parse(sdp)
    audio, video = _media(parsed, "audio", RECEIVING), _media(parsed, "video", RECEIVING)
    if not audio or not video:
        raise OfferSdpError("a WHEP offer must receive audio and video: add recvonly audio and video "
                            "transceivers before createOffer")
    _check_codecs(audio, "audio", SUPPORTED_AUDIO)
    _check_codecs(video, "video", SUPPORTED_VIDEO)
