"""Reference solutions of the exercises (a teacher may delete this folder)."""
