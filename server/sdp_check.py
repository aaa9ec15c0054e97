"""Check a browser's SDP offer before any session is made: it must send audio in a codec we decode and
be able to receive video in a codec we encode. aiortc itself answers such offers silently with codecs the
peer never offered, so the refusal (and its reason) has to come from here.
"""
from __future__ import annotations

from aiortc.codecs import CODECS
from aiortc.sdp import SessionDescription

SUPPORTED_AUDIO = sorted({c.mimeType.split("/", 1)[1].lower() for c in CODECS["audio"]})
SUPPORTED_VIDEO = sorted({c.mimeType.split("/", 1)[1].lower() for c in CODECS["video"]} - {"rtx"})


class OfferSdpError(ValueError):
    """The offer cannot carry a session; the message says what is missing and what to send."""


def check_offer_sdp(sdp: str) -> None:
    """Raise OfferSdpError unless the offer sends microphone audio and receives video in codecs we support."""
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - the parser raises anything from ValueError to AssertionError
        raise OfferSdpError(f"the offer's SDP could not be parsed ({type(exc).__name__}: {exc}); send the "
                            "SDP from RTCPeerConnection.createOffer() unchanged") from None
    audio = [m for m in parsed.media if m.kind == "audio"]
    video = [m for m in parsed.media if m.kind == "video"]
    sending_audio = [m for m in audio if (m.direction or "sendrecv") in ("sendrecv", "sendonly") and m.port != 0]
    if not sending_audio:
        raise OfferSdpError("the offer has no audio track to send; the avatar needs the microphone "
                            "(call addTrack with the getUserMedia audio track before createOffer)")
    for media in sending_audio:
        offered = sorted({codec.mimeType.split("/", 1)[1].lower() for codec in media.rtp.codecs})
        if not set(offered) & set(SUPPORTED_AUDIO):
            raise OfferSdpError(f"the offer's audio codecs {offered or ['none']} are not supported; offer one "
                                f"of {SUPPORTED_AUDIO} (browsers offer opus by default)")
    receiving_video = [m for m in video if (m.direction or "sendrecv") in ("sendrecv", "recvonly") and m.port != 0]
    if not receiving_video:
        raise OfferSdpError("the offer cannot receive video; add a recvonly video transceiver "
                            "(pc.addTransceiver('video', {direction: 'recvonly'}))")
    for media in receiving_video:
        offered = sorted({codec.mimeType.split("/", 1)[1].lower() for codec in media.rtp.codecs} - {"rtx"})
        if not set(offered) & set(SUPPORTED_VIDEO):
            raise OfferSdpError(f"the offer's video codecs {offered or ['none']} are not supported; offer one "
                                f"of {SUPPORTED_VIDEO}")
