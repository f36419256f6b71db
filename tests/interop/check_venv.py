#!/usr/bin/env python3
"""Whether the interop venv holds exactly the pinned packages, with every dependency met.

    check_venv.py REQUIREMENTS

Prints the versions in use; exits 1 (saying why) when a pin is not installed at its version or a
dependency of a pinned package is missing or out of range. torch is Debian's python3-torch, whose
version reads 1.13.0a0 (a pre-release, which pip does not take for "torch>=1.13.0"): torch requirements
are checked against 1.13 without the pre-release tag. A pin whose comment starts with "data:" is a
package that only carries files (a pretrained model): its declared dependencies are not checked.
"""
import importlib.metadata as metadata
import sys


def main():
    pins = {}
    data_only = set()
    with open(sys.argv[1]) as f:
        for line in f:
            line, _, comment = line.partition("#")
            line = line.strip()
            if line:
                name, version = line.split("==")
                pins[name.lower()] = version
                if comment.strip().startswith("data:"):
                    data_only.add(name.lower())
    problems = []
    for name, version in pins.items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append("%s is not installed" % name)
            continue
        if found != version:
            problems.append("%s is %s, pinned %s" % (name, found, version))
    if problems:  # the dependency check needs the pinned packaging
        print("interop venv: " + "; ".join(problems))
        return 1
    from packaging.requirements import Requirement
    from packaging.version import Version
    import torch
    if torch.__file__.startswith(sys.prefix):
        problems.append("torch comes from the venv (%s), not from Debian" % torch.__file__)
    for name in pins:
        if name in data_only:
            continue
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                found = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append("%s needs %s, which is not installed" % (name, req))
                continue
            version = Version(found)
            if req.name == "torch":
                version = Version(version.base_version)
            if not req.specifier.contains(version, prereleases=True):
                problems.append("%s needs %s, found %s" % (name, req, found))
    if problems:
        print("interop venv: " + "; ".join(problems))
        return 1
    print("interop: Python %s; Debian's torch %s (%s), numpy %s; %s" % (
        sys.version.split()[0], torch.__version__, torch.__file__.rsplit("/", 2)[0], metadata.version("numpy"),
        ", ".join("%s %s" % (n, v) for n, v in pins.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
