"""Training concerns beside the loop in train_alignkd.py: checkpoint folders and the teacher cache."""
