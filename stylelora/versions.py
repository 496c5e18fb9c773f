"""The installed libraries against the ranges stylelora declares, and libraries that refuse
each other: either is one line that names the package and the range, never a traceback.

The ranges are read from stylelora's own installed metadata (pyproject.toml's dependencies), so
they are written down in one place. `constraints.txt` pins the set the tests last passed on.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from stylelora.errors import UserError

SKIP_ENV = "STYLELORA_IGNORE_VERSIONS"  # set to 1 to try libraries outside the ranges
TESTED_SET = "pip install -c constraints.txt -e . (in a checkout), the tested versions"


def declared_ranges() -> list[Requirement]:
    """stylelora's required packages with their ranges (not the optional extras)."""
    try:
        lines = metadata.requires("stylelora") or []
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return []
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def out_of_range(
    requirements: list[Requirement], installed: Callable[[str], str] = metadata.version
) -> list[str]:
    """A line for each requirement the installed version does not meet."""
    problems = []
    for requirement in requirements:
        wanted = f"{requirement.name}{requirement.specifier}"
        try:
            found = installed(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is not installed; stylelora needs {wanted}")
            continue
        try:
            ok = requirement.specifier.contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append(f"{requirement.name} {found} is outside the range stylelora supports")
            problems[-1] += f" ({wanted}): pip install '{wanted}', or {TESTED_SET}"
    return problems


def check_installed() -> None:
    """Stop with one line when an installed library is outside stylelora's declared range."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    problems = out_of_range(declared_ranges())
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; set {SKIP_ENV}=1 to try anyway")


# What the libraries say when they refuse another one's version.
REFUSALS = (
    # transformers' and diffusers' check_peft_version
    re.compile(
        r"version of (?P<needed>\w+) you are using is not compatible, please use a version "
        r"(?:>=|that is greater than) (?P<range>[\w.]+)",
        re.IGNORECASE,
    ),
    # transformers' require_version: "peft>=0.22 is required for a normal functioning of ..."
    re.compile(r"(?P<needed>[\w\-]+)(?P<range>[<>=!~]=?[\w.]+) is required for a normal"),
)


def refusal(exc: BaseException) -> str | None:
    """One line for an exception in which one library refuses the version of another."""
    for pattern in REFUSALS:
        match = pattern.search(str(exc))
        if match:
            break
    else:
        return None
    needed = match["needed"].lower()
    spec = match["range"] if match["range"][0] in "<>=!~" else f">={match['range']}"
    try:
        found = metadata.version(needed)
    except metadata.PackageNotFoundError:
        found = "(not installed)"
    library = raising_package(exc)
    by = f"{library} {metadata.version(library)}" if library else "a library"
    return (
        f"{by} refuses {needed} {found}: it needs {needed}{spec}; install the tested set "
        f"({TESTED_SET}) or pip install '{needed}{spec}'"
    )


def raising_package(exc: BaseException) -> str | None:
    """The installed distribution whose code raised `exc` (the innermost frame's package)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        match = re.search(r"site-packages/([A-Za-z_][\w]*)/", frame.filename)
        if match:
            try:
                metadata.version(match[1])
                return match[1]
            except metadata.PackageNotFoundError:
                continue
    return None
