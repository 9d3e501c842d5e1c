"""kcg's implementation. Import the public modules (`kcg`, `kcg.solvers`, ...), which re-export it."""
