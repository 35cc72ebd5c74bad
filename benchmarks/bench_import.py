"""Import cost: what ``import kommo_talks`` adds on top of aiohttp, attrs and cattrs.

Target: the package adds at most 30 ms. Measured with ``-X importtime`` in
fresh interpreters that import the dependencies first, so the figure is the
package's own cumulative import time (its modules and anything only it
pulls in, such as orjson); the median of several runs is reported. Byte
code is written and used, as for an installed package (an environment with
PYTHONDONTWRITEBYTECODE would otherwise compile every module at each start).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

RUNS = 11
TARGET_MS = 30.0


def import_times_ms() -> tuple[float, float]:
    """(dependencies, kommo_talks) cumulative import times of one fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import aiohttp, attrs, cattrs, kommo_talks"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
    )
    cumulative: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, total, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        if total.isdigit():
            cumulative[name] = int(total) / 1000
    deps = sum(cumulative.get(name, 0.0) for name in ("aiohttp", "attrs", "cattrs"))
    return deps, cumulative["kommo_talks"]


def main() -> None:
    import_times_ms()  # writes the byte code
    runs = [import_times_ms() for _ in range(RUNS)]
    deps = statistics.median(r[0] for r in runs)
    package = statistics.median(r[1] for r in runs)
    verdict = "ok" if package <= TARGET_MS else "OVER TARGET"
    print(f"aiohttp + attrs + cattrs        {deps:7.1f} ms")
    target = f"target <= {TARGET_MS:.0f} ms: {verdict}"
    print(f"kommo_talks on top of them      {package:7.1f} ms   ({target})")


if __name__ == "__main__":
    main()
