"""The workspace (Standard mode): people, attributes and definitions, and the outbox of rows their changes
produce, in one SQLite transaction. Knows no storage."""
