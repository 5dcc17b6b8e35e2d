"""Check built wheels: every archon-* requirement (runtime or extra) carries a version bound."""

import re
import sys
import zipfile
from pathlib import Path


def archon_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:") and re.match(r"Requires-Dist:\s*archon", line)]


def main(dist: str) -> None:
    wheels = sorted(Path(dist).glob("archon*.whl"))
    if len(wheels) != 7:
        sys.exit(f"expected 7 archon wheels in {dist}, found {[w.name for w in wheels]}")
    bad = []
    for wheel in wheels:
        for req in archon_requirements(wheel):
            if not re.match(r"archon(-[a-z]+)?\s*(\[[^]]*\])?\s*(==|>=|~=|<)", req):
                bad.append(f"{wheel.name}: {req}")
            print(f"   {wheel.name.split('-')[0]}: Requires-Dist: {req}")
    if bad:
        sys.exit("archon-* requirements without a version: " + "; ".join(bad))
    print(f"== wheels: {len(wheels)} built, every archon-* requirement carries a version")


if __name__ == "__main__":
    main(sys.argv[1])
