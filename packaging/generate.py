"""Files of the Debian package that are derived from the code, so they never drift.

Run by ``packaging/build-deb.sh`` with the packaged virtual environment's Python, so
it sees exactly the code and the distributions that go into the package::

    generate.py conffile agent|collector   commented defaults from config.describe()
    generate.py manpage VERSION DATE       meterd(1) from the argparse parser
    generate.py copyright                  DEP-5 copyright of meterd and what it bundles

Each writes to standard output.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import sys
import typing
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path, PurePath
from typing import Any

PACKAGED_ETC = "/etc/meterd"

# Where the package's layout differs from the code's defaults: the units let the
# daemons write only under /var/lib/meterd, so the embedded ledger lives there.
PACKAGED_VALUES: dict[str, dict[str, object]] = {
    "agent": {},
    "collector": {"ledger.sqlite_path": Path("/var/lib/meterd/collector/ledger.db")},
}

HEADERS = {
    "agent": """\
meterd agent configuration.

Every key is listed with its default, commented out: uncomment a line to change
it. `meterd agent config-help` prints the same list. Relative paths are resolved
against this file's folder, {etc}. After a change, `meterd agent check` says
whether the agent can run with it; `systemctl reload meterd-agent` applies the
interval, metrics, labels and cgroups, other keys need a restart.""",
    "collector": """\
meterd collector configuration.

Every key is listed with its default, commented out: uncomment a line to change
it. `meterd collector config-help` prints the same list; `meterd collector
check-config` loads this file and reports errors. Relative paths are resolved
against this file's folder, {etc}. `systemctl reload meterd-collector` applies
the tariff, accounts and assignments; other keys need a restart. This file may
hold PostgreSQL passwords, so it is readable by root and the meterd group only.""",
}


# --- configuration files ------------------------------------------------------------


def _schema(kind: str) -> type[Any]:
    if kind == "agent":
        from agent.config import AgentConfig

        return AgentConfig
    from collector.config import CollectorConfig

    return CollectorConfig


def _field(cls: type[Any], dotted: str) -> tuple[type[Any], dataclasses.Field[Any]]:
    """The dataclass and field that the describe() key ``dotted`` names."""
    *sections, name = dotted.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    for f in dataclasses.fields(cls):
        if f.name == name:
            return cls, f
    raise KeyError(dotted)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _table_type(tp: Any) -> tuple[str, type[Any]] | None:
    """``("list", C)`` for ``list[C]`` and ``("dict", C)`` for ``dict[str, C]`` when C is
    a configuration dataclass: those are written as example tables."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return "list", args[0]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return "dict", args[1]
    return None


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal that the meterd loader reads back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        # Integers stay integers; fractions are decimal strings (TOML floats are refused).
        return str(value) if value == value.to_integral_value() else json.dumps(str(value))
    if isinstance(value, (str, PurePath)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def conffile(kind: str) -> str:
    """The commented configuration file for ``kind`` (``agent`` or ``collector``)."""
    from common import config

    schema = _schema(kind)
    overrides = dict(PACKAGED_VALUES[kind])
    rows = config.describe(schema)
    known = {key for key, _, _ in rows}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"packaged values for unknown {kind} keys: {', '.join(unknown)}")

    plain: dict[str, list[tuple[str, str, str]]] = {}
    examples: list[tuple[str, str, str, type[Any]]] = []
    for key, _, help_text in rows:
        owner, f = _field(schema, key)
        table = _table_type(typing.get_type_hints(owner)[f.name])
        section, _, name = key.rpartition(".")
        if table is not None:
            examples.append((key, help_text, table[0], table[1]))
            continue
        plain.setdefault(section, []).append((name, help_text, key))

    lines = _comment(HEADERS[kind].format(etc=PACKAGED_ETC))
    for section, entries in sorted(plain.items(), key=lambda item: item[0] != ""):
        lines.append("")
        if section:
            lines.append(f"[{section}]")
        for name, help_text, key in entries:
            _, f = _field(schema, key)
            lines.extend(_comment(help_text))
            if key in overrides:
                lines.append(f"# (the code's default is {toml_value(_default(f))}; the package "
                             "keeps state under /var/lib/meterd)")
                lines.append(f"{name} = {toml_value(overrides.pop(key))}")
            else:
                lines.append(f"#{name} = {toml_value(_default(f))}")
    for key, help_text, shape, item in examples:
        lines.append("")
        lines.extend(_comment(f"{help_text}; an example, one table per item:"))
        lines.append(f"#[[{key}]]" if shape == "list" else f"#[{key}.ID]")
        for sub_key, _, sub_help in config.describe(item):
            _, f = _field(item, sub_key)
            value = _default(f)
            shown = '"..."' if value is dataclasses.MISSING else toml_value(value)
            required = " (required)" if value is dataclasses.MISSING else ""
            lines.append(f"#   {sub_key} = {shown}    # {sub_help}{required}")
    return "\n".join(lines) + "\n"


# --- manual page --------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield helps.get(name, ""), sub


def _leaves(
    parser: argparse.ArgumentParser, help_text: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    children = list(_subcommands(parser))
    if not children:
        yield help_text, parser
        return
    for child_help, child in children:
        yield from _leaves(child, child_help)


def manpage(version: str, date: str) -> str:
    from common.cli import build_parser

    parser = build_parser()
    out = [
        f'.TH METERD 1 "{date}" "meterd {_roff(version)}" "meterd manual"',
        ".SH NAME",
        "meterd \\- usage metering and billing for server\\-rental providers",
        ".SH SYNOPSIS",
        ".B meterd",
        ".I command",
        "[\\fIaction\\fR] [\\fIoptions\\fR]",
        ".br",
        ".B meterd \\-\\-version",
        ".SH DESCRIPTION",
        _roff(
            "An agent on every metered host samples resource usage, keeps it in a durable "
            "local spool and ships it over mutual TLS to a central collector, which rates "
            "it against the tariff and posts it to a double-entry ledger."
        ),
        ".PP",
        _roff(
            "The systemd units meterd-agent.service and meterd-collector.service run "
            "\"meterd agent run\" and \"meterd collector run\"; neither is enabled when the "
            "package is installed."
        ),
        ".SH COMMANDS",
    ]
    for help_text, leaf in _leaves(parser):
        usage = " ".join(leaf.format_usage().split()).removeprefix("usage: ")
        out += [".TP", f".B {_roff(usage)}", _roff(help_text or (leaf.description or ""))]
    out += [
        ".SH FILES",
        ".TP",
        ".I /etc/meterd/agent.toml",
        "Agent configuration; \\fBmeterd agent config\\-help\\fR lists every key.",
        ".TP",
        ".I /etc/meterd/collector.toml",
        "Collector configuration; \\fBmeterd collector config\\-help\\fR lists every key.",
        ".TP",
        ".I /etc/meterd/tls/",
        "Certificates and private keys (mode 0700, owned by the meterd user).",
        ".TP",
        ".I /var/lib/meterd/",
        "The agent's spool and the embedded ledger.",
        ".SH EXIT STATUS",
        "0 on success, 1 when a command fails or a check finds a problem, 2 on a usage error.",
        ".SH SEE ALSO",
        ".BR systemctl (1),",
        ".BR journalctl (1)",
    ]
    return "\n".join(out) + "\n"


# --- copyright ----------------------------------------------------------------------

_CLASSIFIERS = {
    "Apache Software License": "Apache-2.0",
    "MIT License": "MIT",
    "BSD License": "BSD",
    "Python Software Foundation License": "PSF-2.0",
    "ISC License (ISCL)": "ISC",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "Public Domain": "public-domain",
}


def _license(meta: Any) -> str:
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return expression
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 60:
        return text
    names = [
        _CLASSIFIERS.get(c.rsplit(" :: ", 1)[-1], c.rsplit(" :: ", 1)[-1])
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    return " or ".join(names) if names else "unknown"


def _tops(files: Iterable[PurePath]) -> list[str]:
    tops = set()
    for f in files:
        parts = PurePath(f).parts
        if not parts or parts[0] == ".." or parts[0].endswith(".dist-info"):
            continue
        tops.add(parts[0])
    return sorted(tops)


def copyright_file(site_packages: str) -> str:
    out = [
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
        "Upstream-Name: meterd",
        "Comment: The package carries its own Python virtual environment in /opt/meterd,",
        " with the distributions listed below. Each one's licence texts are in its",
        f" .dist-info folder under /{site_packages}/.",
        "",
        "Files: *",
        "Copyright: the meterd authors",
        "License: Apache-2.0",
        " On Debian systems, the full text of the Apache License, Version 2.0 is in",
        " /usr/share/common-licenses/Apache-2.0.",
    ]
    dists = sorted(
        importlib.metadata.distributions(), key=lambda d: str(d.metadata["Name"]).lower()
    )
    for dist in dists:
        meta = dist.metadata
        name = str(meta["Name"])
        if name == "meterd":
            continue
        files = list(dist.files or [])
        dist_info = next(
            (PurePath(f).parts[0] for f in files if PurePath(f).parts[0].endswith(".dist-info")),
            f"{name}-{dist.version}.dist-info",
        )
        licences = sorted(
            str(f) for f in files
            if any(w in PurePath(f).name.upper() for w in ("LICEN", "COPYING", "NOTICE"))
        )
        holder = (meta.get("Author") or meta.get("Author-email") or meta.get("Maintainer")
                  or f"the {name} authors").strip().replace("\n", " ")
        patterns = [f"{site_packages}/{top}" + ("/*" if "." not in top else "")
                    for top in _tops(files)] + [f"{site_packages}/{dist_info}/*"]
        out += ["", "Files: " + patterns[0]]
        out += [f" {p}" for p in patterns[1:]]
        out += [f"Copyright: {holder}", f"License: {_license(meta)}",
                f" {name} {dist.version}; the licence text is in"]
        out += [f" /{site_packages}/{path}" for path in licences] or [
            f" /{site_packages}/{dist_info}/"
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    conf = sub.add_parser("conffile")
    conf.add_argument("kind", choices=["agent", "collector"])
    man = sub.add_parser("manpage")
    man.add_argument("version")
    man.add_argument("date")
    copy = sub.add_parser("copyright")
    copy.add_argument("site_packages", help="site-packages path inside the package, no leading /")
    args = parser.parse_args(argv)
    if args.what == "conffile":
        sys.stdout.write(conffile(args.kind))
    elif args.what == "manpage":
        sys.stdout.write(manpage(args.version, args.date))
    else:
        sys.stdout.write(copyright_file(args.site_packages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
