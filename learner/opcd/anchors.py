"""General prompts that keep a consolidated adapter close to the base model outside its namespace.

OPCD moves what the teacher's context teaches into the weights; without a counterweight it also moves
it where it does not belong (on the default model an adapter that learned a greeting rule greeted in
every answer and lost instruction following: bench/README.md). With
``OPCDConfig.anchor_fraction`` a share of every batch is drawn from these prompts, and for them the
teacher sees *no* experience: it is the frozen round-start model itself, so the reverse KL pulls the
student back to its old behaviour on general requests while the task prefixes pull it to the
experience.

Written for this project; deliberately disjoint from the OOD check's prompts (:mod:`evaluation.ood`), so
the gate still measures drift on prompts the learner never trained on.
"""

from __future__ import annotations

GENERAL_PROMPTS: tuple[str, ...] = (
    "What is photosynthesis?",
    "Give me a simple recipe for pancakes.",
    "How do I reset a forgotten email password?",
    "Write a short email asking a colleague to move our meeting to Thursday.",
    "What are three tips for sleeping better?",
    "Explain what a prime number is.",
    "Suggest a name for a small bakery.",
    "How many legs does a spider have?",
    "Write a limerick about a lazy dog.",
    "What is the difference between weather and climate?",
    "Summarise the story of Little Red Riding Hood.",
    "How do I convert 10 kilometres to miles?",
    "Give me a packing list for a weekend camping trip.",
    "Why do leaves fall from trees in autumn?",
    "What should I say in a job interview when asked about my weaknesses?",
    "Write a two-line birthday message for my sister.",
    "Explain how a bicycle gear works.",
    "What is the boiling point of water at sea level?",
    "Recommend three classic novels and say why.",
    "How can I start learning to play the guitar?",
    "What does a database index do?",
    "Tell me a fun fact about octopuses.",
    "Write a polite reply declining an invitation to a dinner party.",
    "What is the capital of Japan, and what is it known for?",
    "Describe how to plant tomato seeds.",
    "Explain the rules of tic-tac-toe.",
    "What are the main causes of inflation?",
    "Write a short motivational quote about persistence.",
    "How do vaccines train the immune system?",
    "List four ways to save water at home.",
    "What is a haiku? Give an example about winter.",
    "Help me write a to-do list for moving to a new flat.",
)
"""General requests (one user message each), written here."""
