"""Reference solutions of the exercises, one module per notebook, written as the notebooks write their cells.

Read by `mt.exercises.solution(name)`, which prints one when a learner asks, and by the tests. Nothing else imports
them: try an exercise before reading its solution.
"""
