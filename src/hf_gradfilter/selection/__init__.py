"""Stage 4, the selection: the top rows by a score, globally, per group or by quota (`top`, pure
index arithmetic), and the select stage over a scored dataset (`select`: `pick_rows`, the `select` verb)."""

from .top import format_group_table, group_counts, select_top, top_indices, top_indices_by_group

__all__ = ["format_group_table", "group_counts", "select_top", "top_indices", "top_indices_by_group"]
