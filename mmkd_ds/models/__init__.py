"""The trained module (student + MMKD heads)."""
