"""CSV files (RFC 4180, a header line, ISO-8601 timestamps)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cio_sync.formats.base import timestamps_as_iso

#: Cells a spreadsheet would run as a formula start with one of these (OWASP "CSV injection").
_FORMULA_START: Final = r"^[=+\-@\t\r]"


def _neutralize_formulas(table: pa.Table) -> pa.Table:
    """String cells that start like a formula, prefixed with an apostrophe so spreadsheets show them as text."""
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            column = table.column(i)
            risky = pc.fill_null(pc.match_substring_regex(column, _FORMULA_START), False)
            if pc.any(risky).as_py():
                safe = pc.if_else(risky, pc.binary_join_element_wise("'", column, ""), column)
                table = table.set_column(i, field, safe)
    return table


@dataclass(frozen=True, kw_only=True)
class CsvFormat:
    """CSV: one header row, RFC 4180 quoting, UTF-8, an empty cell for null, timestamps as ISO-8601 UTC text.

    With ``neutralize_formulas``, a text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
    return is written with a leading apostrophe, so a spreadsheet opening the file shows it instead of running it.
    This changes those cells: leave it off for files that only machines read.
    """

    neutralize_formulas: bool = False

    name: ClassVar[str] = "csv"
    extension: ClassVar[str] = "csv"

    def encode(self, table: pa.Table) -> bytes:
        out = io.BytesIO()
        table = timestamps_as_iso(table)
        if self.neutralize_formulas:
            table = _neutralize_formulas(table)
        pacsv.write_csv(table, out, write_options=pacsv.WriteOptions(include_header=True))
        return out.getvalue()
