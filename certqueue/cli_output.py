"""How the ``certqueue`` command line prints: the consoles, exit codes, one-line errors and the output
formats every command that prints data offers (``-o table|wide|json|tsv``, ``--json`` = ``-o json``).

Imported by certqueue.cli, every certqueue.cli_* module and certqueue.demo; it imports none of them
(no cycle). rich is imported only when a table is drawn on a terminal: JSON, TSV and piped tables
are plain text.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

EXIT_FAILED, EXIT_INPUT, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_DEFERRED = 1, 2, 3, 4, 5

#: table: the columns that fit a terminal (first name and "+N"); wide: every column and every name;
#: json: today's JSON shapes; tsv: a header line, then one tab-separated line per record, every value
#: whole (lists joined by commas), for cut and awk
OUTPUT_FORMATS = ("table", "wide", "json", "tsv")


class _LazyConsole:
    """A rich Console built on first use: a command that prints JSON (or nothing) does not import
    rich, which costs every command tens of milliseconds."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def _get(self) -> Any:
        if self._console is None:
            from rich.console import Console

            options = dict(self._options)
            if not options.get("stderr") and not stdout_is_terminal():
                options.setdefault("soft_wrap", True)  # a line piped is one line, not folded at 80
            self._console = Console(**options)
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Tables print as tab-separated lines when stdout is not a terminal (a pipe, a file): every
        value whole on its line, for grep, cut and awk, with no box drawing and no folding at 80
        columns. A terminal gets the drawn table."""
        if objects and not self._options.get("stderr") and not stdout_is_terminal():
            if all(isinstance(o, PlainTable) for o in objects):
                for table in objects:
                    table.print_plain()
                return
            if all(isinstance(o, str) for o in objects):
                click.echo(" ".join(_unmarked(str(o)) for o in objects))  # no styling to load
                return
        self._get().print(*(o.rich() if isinstance(o, PlainTable) else o for o in objects), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._get(), name, value)


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def _unmarked(text: str) -> str:
    """``text`` without rich's style tags (``[bold]x[/]`` is ``x``), without importing rich."""
    if "[" not in text:
        return text
    from rich.text import Text

    return Text.from_markup(text).plain


def _one_line(value: str, *, markup: bool = True) -> str:
    # one line per row, whatever a value holds
    return " ".join((_unmarked(value) if markup else value).split())


class PlainTable:
    """A table kept as text: drawn by rich on a terminal, printed as plain lines otherwise (its
    title, the column names, then one line per row, tab-separated, every value whole)."""

    def __init__(self, title: str | None = None, *, markup: bool = True, **options: Any) -> None:
        self.title = title
        #: False: the cells are data, printed as they are (a name or value holding "[x]" keeps it)
        self.markup = markup
        self.options = options
        self.columns: list[tuple[str, dict[str, Any]]] = []
        self.rows: list[list[str]] = []

    def add_column(self, header: str, **options: Any) -> None:
        self.columns.append((header, options))

    def add_row(self, *cells: str) -> None:
        self.rows.append([str(c) for c in cells])

    def print_plain(self) -> None:
        if self.title:
            click.echo(_one_line(self.title))
        click.echo("\t".join(_one_line(h) for h, _ in self.columns))
        for row in self.rows:
            # a cell drawn on several lines (every name in wide) is one comma-joined value here
            cells = (", ".join(cell.splitlines()) for cell in row)
            click.echo("\t".join(_one_line(cell, markup=self.markup) for cell in cells))
        click.echo("")

    def rich(self) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, **self.options)
        for header, options in self.columns:
            table.add_column(header, **options)
        if self.markup:
            for row in self.rows:
                table.add_row(*row)
        else:
            from rich.text import Text

            for row in self.rows:
                table.add_row(*(Text(cell) for cell in row))
        return table


def Table(title: str | None = None, *, markup: bool = True, **options: Any) -> PlainTable:
    """A table for ``console.print`` (rich's Table options: title, show_lines, ...)."""
    return PlainTable(title, markup=markup, **options)


console: Any = _LazyConsole()
err_console: Any = _LazyConsole(stderr=True)


def fail(msg: str, code: int) -> None:
    """One line on stderr (``error: ...``), then exit with ``code``: a message of several lines (a
    YAML parser's, a server's) is joined into one."""
    msg = " ".join(line.strip() for line in msg.splitlines() if line.strip() and line.strip() != "^")
    if sys.stderr.isatty():
        from rich.markup import escape  # a message is text: "certqueue[aws]" is not a style tag

        err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    else:
        click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


# --- -o/--output ------------------------------------------------------------------------------------


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``-o/--output FORMAT`` and ``--json`` (the same as ``-o json``), given to the command as one
    ``output`` argument (``"table"`` when neither is given)."""

    @functools.wraps(f)
    def wrapper(*args: Any, output: str | None, as_json: bool, **kwargs: Any) -> Any:
        if as_json and output not in (None, "json"):
            raise click.UsageError(f"--json is -o json: give one of --json and -o {output}")
        return f(*args, output="json" if as_json else output or "table", **kwargs)

    click.option("--json", "as_json", is_flag=True, help="Machine-readable output: the same as -o json.")(
        wrapper
    )
    click.option(
        "-o",
        "--output",
        type=click.Choice(OUTPUT_FORMATS),
        help="table (default), wide (every column and name), json, or tsv (a header line, then one"
        " tab-separated line per record, for cut and awk).",
    )(wrapper)
    return wrapper


@dataclass(frozen=True)
class Column:
    """One column of a command's records: its header and where its value is in a record."""

    header: str
    key: str
    #: only in wide and tsv
    wide: bool = False
    #: a list of names: the table shows the first and "+N", wide every one
    names: bool = False
    #: an ISO timestamp: tables show it to the second, without the "T"
    when: bool = False
    #: with ``when``: the table shows the day only (wide: to the second, tsv: the whole timestamp)
    day: bool = False
    #: a terminal colour for a value (state colours)
    style: Mapping[str, str] | None = None


def value_text(value: Any, *, sep: str = ", ") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return sep.join(value_text(v, sep=sep) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def _cell(column: Column, value: Any, output: str, terminal: bool) -> str:
    if column.names and isinstance(value, list | tuple):
        names = [str(v) for v in value]
        if output == "wide":
            text = "\n".join(names) if terminal else ", ".join(names)
        else:
            text = (names[0] if names else "") + (f" +{len(names) - 1}" if len(names) > 1 else "")
    elif column.when and isinstance(value, str):
        text = value[:10] if column.day and output == "table" else value[:19].replace("T", " ")
    else:
        text = value_text(value)
    if terminal:
        from rich.markup import escape

        text = escape(text)
        if column.style and text in column.style:
            text = f"[{column.style[text]}]{text}[/]"
    return text


def print_tsv(records: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> None:
    """A header line, then one line per record: every value whole, lists joined by commas."""
    click.echo("\t".join(c.header for c in columns))
    for r in records:
        click.echo("\t".join(" ".join(value_text(r.get(c.key), sep=",").split()) for c in columns))


def render(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    output: str,
    *,
    title: str | None = None,
    data: Any = None,
) -> None:
    """Print ``records`` in ``output`` format: ``data`` (default the records) as JSON, the records as
    TSV, or as a table (on a terminal drawn, else plain tab-separated lines under the title)."""
    if output == "json":
        print_json(list(records) if data is None else data)
        return
    if output == "tsv":
        print_tsv(records, columns)
        return
    terminal = stdout_is_terminal()
    shown = [c for c in columns if output == "wide" or not c.wide]
    rows = [[_cell(c, r.get(c.key), output, terminal) for c in shown] for r in records]
    table = Table(title=title, markup=terminal)  # on a terminal the cells are escaped (_cell)
    for i, c in enumerate(shown):
        if i == 0 or c.when or c.style:
            # the id, state and times are kept whole on a terminal too: the other columns give way
            longest = max([len(c.header), *(len(_unmarked(row[i])) for row in rows)])
            table.add_column(c.header, no_wrap=True, min_width=longest)
        else:
            table.add_column(c.header, overflow="fold")
    for row in rows:
        table.add_row(*row)
    if output == "wide" and terminal:
        # every column at its natural width, as kubectl's wide does: the terminal wraps a long line
        # rather than rich folding each cell to a letter per line
        widths = [
            max([len(c.header), *(len(line) for row in rows for line in _unmarked(row[i]).splitlines())])
            for i, c in enumerate(shown)
        ]
        from rich.console import Console

        Console(width=max(sum(widths) + 3 * len(widths) + 4, console.width)).print(table.rich())
        return
    console.print(table)


# --- certificates -----------------------------------------------------------------------------------

STATE_STYLES = {"ACTIVE": "green", "FAILED": "red", "REVOKED": "magenta", "EXPIRED": "red"}

#: the inventory's columns: id, state, expiry (the day), then names, which fit 80 columns; wide adds
#: the issuing CA's name, the CA (its directory's host), challenge, renewal time and any deferral
CERTIFICATE_COLUMNS = (
    Column("id", "id"),
    Column("state", "state", style=STATE_STYLES),
    Column("expires", "not_after", when=True, day=True),
    Column("names", "domains", names=True),
    Column("issuer", "issuer_cn", wide=True),
    Column("CA", "ca", wide=True),
    Column("challenge", "challenge_type", wide=True),
    Column("renew at", "renew_at", wide=True, when=True),
    Column("waiting", "waiting_text", wide=True),
)


def waiting_text(w: Mapping[str, Any] | None) -> str:
    if not w:
        return ""
    when = (w.get("until") or "")[:16].replace("T", " ")
    return f"{w['reason']}, resumes {when} UTC" if when else str(w["reason"])


def short_issuer(issuer: str | None) -> str:
    if not issuer:
        return ""
    for part in issuer.split(","):
        if part.strip().startswith("CN="):
            return part.strip()[3:]
    return issuer


def certificate_record(row: Mapping[str, Any], ca: str | None = None) -> dict[str, Any]:
    """A certificate's JSON row with what its table shows besides (issuer CN, CA, deferral text)."""
    return {
        **row,
        "issuer_cn": short_issuer(row.get("issuer")),
        "ca": ca,
        "waiting_text": waiting_text(row.get("waiting")),
    }


def print_inventory(rows: Sequence[Mapping[str, Any]], output: str = "table") -> None:
    """Certificates (the JSON rows of ``certqueue list``; ``ca`` is the CA, where known). A deferral
    is worth a column even in the narrow table, when a certificate waits."""
    records = [certificate_record(r, r.get("ca")) for r in rows]
    columns = list(CERTIFICATE_COLUMNS)
    if output == "table" and any(r["waiting_text"] for r in records):
        columns[-1] = Column("waiting", "waiting_text")
    render(records, columns, output, title=f"certificates ({len(rows)})", data=list(rows))
