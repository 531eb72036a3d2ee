"""Invite codes read aloud: ``7-crayon-galaxy-lunar``, a nameplate and three words from our own list.

The 24 bits of the words are only ever the password of a SPAKE2 exchange
(:mod:`securechat.pki.enrollment`), so a recording gives nothing to guess against offline.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

# Nameplates 1-999: one to three digits to read aloud; far more than invites alive at once.
NAMEPLATE_MAX = 999


# Our own list: 256 short, concrete, easy-to-spell English words (things you can picture, so they
# survive being read over the phone); 8 bits each, 24 bits a code.
WORDS: tuple[str, ...] = (
    "acorn", "actor", "adobe", "agent", "album", "alley", "amber", "anchor", "angle", "apple", "apron",
    "arena", "arrow", "atlas", "attic", "autumn", "bacon", "badge", "bagel", "bamboo", "banjo", "barley",
    "basket", "beach", "beacon", "beaver", "beetle", "bench", "berry", "biscuit", "bison", "blanket",
    "blossom", "bonnet", "bottle", "bramble", "bridge", "bronze", "brook", "bucket", "buffalo", "bugle",
    "button", "cabin", "cactus", "camel", "candle", "canoe", "canyon", "carpet", "carrot", "castle", "cedar",
    "cello", "cherry", "chess", "chimney", "cider", "circus", "clover", "cobalt", "cocoa", "comet", "compass",
    "copper", "coral", "cotton", "cougar", "crayon", "cricket", "crystal", "cushion", "dahlia", "daisy",
    "dance", "delta", "denim", "desert", "diamond", "dolphin", "donkey", "dragon", "drum", "eagle", "easel",
    "echo", "elbow", "ember", "emerald", "engine", "falcon", "feather", "fennel", "ferry", "fiddle", "fig",
    "flute", "forest", "fossil", "fountain", "fox", "galaxy", "garden", "garlic", "gecko", "ginger", "glacier",
    "globe", "goblet", "gondola", "gorilla", "granite", "grape", "gravel", "guitar", "hammer", "harbor",
    "harp", "harvest", "hazel", "helmet", "heron", "hickory", "honey", "hornet", "husky", "igloo", "indigo",
    "iris", "island", "ivory", "jacket", "jaguar", "jasmine", "jelly", "jigsaw", "jungle", "kayak", "kettle",
    "kiwi", "koala", "ladder", "lagoon", "lantern", "lemon", "lentil", "lilac", "lizard", "lobster", "locket",
    "lunar", "magnet", "mango", "maple", "marble", "meadow", "melon", "meteor", "mitten", "monkey", "mosaic",
    "muffin", "mustard", "napkin", "nectar", "needle", "nickel", "noodle", "nutmeg", "oasis", "ocean", "olive",
    "onion", "orbit", "orchid", "otter", "oyster", "paddle", "panda", "papaya", "parrot", "peach", "pebble",
    "pepper", "piano", "pickle", "pigeon", "pilot", "pixel", "planet", "plum", "pocket", "pony", "potato",
    "prism", "pumpkin", "puzzle", "quartz", "quill", "rabbit", "radar", "radish", "raven", "ribbon", "river",
    "robin", "rocket", "saddle", "salmon", "sandal", "saturn", "scarf", "senate", "shadow", "sierra", "silver",
    "skate", "sleigh", "socket", "sparrow", "spider", "spruce", "squid", "statue", "summit", "sunset", "tango",
    "temple", "thimble", "thunder", "tiger", "timber", "toast", "tomato", "topaz", "tractor", "trumpet",
    "tulip", "tundra", "turtle", "umbrella", "valley", "velvet", "violin", "wagon", "walnut", "walrus",
    "whistle", "willow", "window", "wizard", "wombat", "yarn", "yogurt", "zebra", "zigzag",
)
_WORD_SET = frozenset(WORDS)
CODE_WORDS = 3


def format_code(nameplate: int, words: Sequence[str]) -> str:
    return "-".join([str(nameplate), *words])


def new_words() -> list[str]:
    return [secrets.choice(WORDS) for _ in range(CODE_WORDS)]


def parse_code(text: str) -> tuple[int, str]:
    """``(nameplate, normalised code)`` of what the joiner typed; ValueError with the reason."""
    parts = [p for p in re.split(r"[\s\-]+", text.strip().lower()) if p]
    if len(parts) != CODE_WORDS + 1 or not parts[0].isdigit():
        raise ValueError(f"{text!r} is not an invite code: it looks like 7-crayon-galaxy-lunar (a number and "
                         f"{CODE_WORDS} words)")
    nameplate = int(parts[0])
    if not 1 <= nameplate <= NAMEPLATE_MAX:
        raise ValueError(f"{text!r} is not an invite code: the number is 1 to {NAMEPLATE_MAX}")
    for word in parts[1:]:
        if word not in _WORD_SET:
            raise ValueError(f"{word!r} is not one of the invite words: check the spelling of the code")
    return nameplate, format_code(nameplate, parts[1:])
