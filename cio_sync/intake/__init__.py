"""Intake: parsing and validating calls and records, before any sink sees them. Knows no sink and no storage."""
