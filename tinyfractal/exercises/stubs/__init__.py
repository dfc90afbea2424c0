"""Exercise stubs: copied to a student folder by `python -m tinyfractal.exercises start`."""
