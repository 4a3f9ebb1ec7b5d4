"""Structures out, scores in: validity, matching, CSP and generation scores, reports, plots."""
