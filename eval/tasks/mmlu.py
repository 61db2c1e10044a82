"""MMLU (Hendrycks et al. 2021): 57 subjects, 14,042 test questions; micro average.

Qwen-7B (original) reported: base 5-shot 56.7 (STEM 47.6, Social Sciences 65.9, Humanities 51.5,
Others 64.7); chat 0-shot 53.9. Prompts, choice ids and the 2047-token truncation follow spec 2.2 / 4.2.
"""
from ..data import DataSource
from ..multiple_choice import LETTERS, MultipleChoiceTask, extract_with_cascade, replace_options, subject_rows

CATEGORIES = {  # Qwen's own mapping (19/13/13/12); anatomy counts as STEM
    "STEM": ("abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"),
    "Humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "Other": ("business_ethics", "college_medicine", "human_aging", "management", "marketing", "medical_genetics",
              "miscellaneous", "nutrition", "professional_accounting", "professional_medicine", "virology",
              "global_facts", "clinical_knowledge"),
    "Social Sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
}
CHAT_INSTRUCTION = ("The following is a multiple-choice question. Please choose the most suitable one among "
                    "A, B, C and D as the answer to this question.")
CHAT_PATTERNS = [
    r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:|is|:|be))\b)[^ABCD]{0,20}?\b(A|B|C|D)\b",
    r"\b(A|B|C|D)\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b",
    r"^(A|B|C|D)(?:\.|,|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]
HUB_LETTERS = dict(enumerate(LETTERS))


class MMLU(MultipleChoiceTask):
    name, split, version = "mmlu", "test", "qwen-2023-08"
    categories, averaging = CATEGORIES, "micro"
    choice_strings = (" A", " B", " C", " D")  # the prompt ends in "Answer:"; shots answer " A"
    max_prompt_tokens = 2048

    def rows(self, data: DataSource, subject: str, split: str) -> list[dict]:
        if data.root is None:
            return [{"question": r["question"], **dict(zip(LETTERS, r["choices"])), "answer": HUB_LETTERS[r["answer"]]}
                    for r in data.hub("cais/mmlu", subject, {"dev": "dev", "test": "test"}[split])]
        path = data.path("mmlu", split, f"{subject}_{split}.csv", what=f"subject {subject}")
        frame = data.read_csv(path, names=["question", "A", "B", "C", "D", "answer"], index_col=False, header=None)
        return subject_rows(frame, {k: k for k in ("question", *LETTERS, "answer")}, path, header=False)

    def fewshot_prefix(self, subject: str, shots: list[dict]) -> str:
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        return header + "".join(f"{self.question(s)} {s['answer']}\n\n" for s in shots)

    def question(self, row: dict) -> str:
        return f"Question: {row['question']}" + "".join(f"\n{x}. {row[x]}" for x in LETTERS) + "\nAnswer:"

    def chat_message(self, row: dict) -> str:
        return f"{CHAT_INSTRUCTION}\n\n{row['question']}\n" + "".join(f"{x}. {row[x]}\n" for x in LETTERS)

    def extract(self, response: str, row: dict, options: dict) -> tuple[str, str]:
        text = replace_options(response, row, strip=".", ignore_case=True, word_bounded=options.get("word_bounded", False))
        return extract_with_cascade(text, row, CHAT_PATTERNS)


TASK = MMLU()
