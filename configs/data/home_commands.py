"""Writes home_commands.jsonl, the bundled generative example's data (configs/smollm2-commands.json).

Written for Grove, not collected: short smart-home commands, phrased several ways, each with
the one-line JSON a home controller would take. The answer is free text of 15-30 tokens, and
fully determined by the command, so a 135M model learns it in a short training.
Run: python configs/data/home_commands.py  (seeded: the same file every time)
"""

import json
import random
from pathlib import Path

ROOMS = ["kitchen", "bedroom", "living room", "office", "bathroom", "garage", "hallway"]
SWITCHED = {"lights": ["the lights", "the light", "the lamps"], "fan": ["the fan"], "heater": ["the heater"],
            "tv": ["the TV", "the television"], "radio": ["the radio"]}
OPENED = {"blinds": ["the blinds", "the shades"], "window": ["the window"], "door": ["the door"]}
TIMES = {"7 am": "07:00", "8 am": "08:00", "noon": "12:00", "6 pm": "18:00", "9 pm": "21:00",
         "10 pm": "22:00", "11 pm": "23:00", "midnight": "00:00"}


def answer(action: str, device: str, room: str, value: int | None = None, time: str | None = None) -> str:
    parts = {"action": action, "device": device, "room": room}
    if value is not None:
        parts["value"] = value
    if time is not None:
        parts["time"] = time
    return json.dumps(parts)


def command(rng: random.Random) -> dict[str, str]:
    room = rng.choice(ROOMS)
    kind = rng.choice(["switch", "switch", "open", "set", "dim"])
    when = rng.choice([None, None, *TIMES])
    at = f" at {when}" if when else ""
    time = TIMES[when] if when else None
    if kind == "switch":
        device = rng.choice(list(SWITCHED))
        action = rng.choice(["on", "off"])
        phrase = rng.choice([f"turn {action} {rng.choice(SWITCHED[device])} in the {room}",
                             f"switch {rng.choice(SWITCHED[device])} {action} in the {room}",
                             f"{room} {device} {action}"])
        return {"command": phrase + at, "json": answer(action, device, room, time=time)}
    if kind == "open":
        device = rng.choice(list(OPENED))
        action = rng.choice(["open", "close"])
        phrase = rng.choice([f"{action} {rng.choice(OPENED[device])} in the {room}",
                             f"please {action} the {room} {device}"])
        return {"command": phrase + at, "json": answer(action, device, room, time=time)}
    if kind == "set":
        degrees = rng.randint(16, 26)
        phrase = rng.choice([f"set the {room} to {degrees} degrees", f"make the {room} {degrees} degrees",
                             f"heat the {room} to {degrees}"])
        return {"command": phrase + at, "json": answer("set", "thermostat", room, degrees, time)}
    level = rng.choice([10, 20, 25, 30, 40, 50, 60, 75, 80])
    phrase = rng.choice([f"dim the {room} lights to {level} percent", f"{room} lights at {level}%"])
    return {"command": phrase + at, "json": answer("dim", "lights", room, level, time)}


def main() -> None:
    rng, rows, seen = random.Random(21), [], set()
    while len(rows) < 120:
        row = command(rng)
        if row["command"] not in seen:
            seen.add(row["command"])
            rows.append(row)
    Path(__file__).with_name("home_commands.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
