"""MetaSchedule tuning: database.py (where records live, reading, merging, shipping) and
tuner.py (tasks and the tuning loop).
"""
