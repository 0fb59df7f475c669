"""MetaSchedule tuning: database.py (where records live, reading, merging, shipping),
tasks.py (the kernels to tune), tuner.py (the tuning loop) and measuring.py (how and where
candidates are built and timed).
"""
