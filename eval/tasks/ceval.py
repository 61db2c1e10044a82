"""C-Eval (Huang et al. 2023): 52 subjects, validation split (1,346 questions); macro average + Hard.

Qwen-7B (original) reported: base 5-shot val 60.8; chat 0-shot val 54.2. Prompts follow spec 2.3 / 4.3.
The test split has no public answers (leaderboard submission), so it is not scored here.
"""
from ..data import DataSource
from ..multiple_choice import LETTERS, MultipleChoiceTask, extract_with_cascade, replace_options, subject_rows

CATEGORIES = {
    "STEM": ("computer_network", "operating_system", "computer_architecture", "college_programming", "college_physics",
             "college_chemistry", "advanced_mathematics", "probability_and_statistics", "discrete_mathematics",
             "electrical_engineer", "metrology_engineer", "high_school_mathematics", "high_school_physics",
             "high_school_chemistry", "high_school_biology", "middle_school_mathematics", "middle_school_biology",
             "middle_school_physics", "middle_school_chemistry", "veterinary_medicine"),
    "Social Science": ("college_economics", "business_administration", "marxism", "mao_zedong_thought",
                       "education_science", "teacher_qualification", "high_school_politics", "high_school_geography",
                       "middle_school_politics", "middle_school_geography"),
    "Humanities": ("modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
                   "chinese_language_and_literature", "art_studies", "professional_tour_guide", "legal_professional",
                   "high_school_chinese", "high_school_history", "middle_school_history"),
    "Other": ("civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
              "urban_and_rural_planner", "accountant", "fire_engineer", "environmental_impact_assessment_engineer",
              "tax_accountant", "physician"),
}
HARD = ("advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_physics",
        "college_chemistry", "high_school_mathematics", "high_school_physics", "high_school_chemistry")

# The chat extraction cascade, current version (QwenLM/Qwen 4864f7b, 2023-08-25).
RULES_2023_08_25 = [
    r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)",
    r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))[^ABCD]{0,4}?(?:正确|对[的，。：]|符合)",
    r"^[\(（]?(A|B|C|D)(?:。|\)|）|\.|，|,|．|：|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]
# The version that produced the reported 54.2 (1134e08, 2023-08-03), rebuilt from the spec's list of differences.
RULES_2023_08_03 = [
    r"(?:(?:选|选择|选定)|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|为|：|:|】))[^ABCD]{0,10}?(?:是|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$)",
    r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对|符合))[^ABCD]{0,4}?(?:正确|对|符合)",
    r"^(A|B|C|D)(?:。|\.|，|,|．|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]
CHAT_RULES = {"2023-08-25": RULES_2023_08_25, "2023-08-03": RULES_2023_08_03}


def chinese_question(row: dict) -> str:
    return f"问题：{row['question']}" + "".join(f"\n{x}. {row[x]}" for x in LETTERS) + "\n答案："


def extract_chinese(response: str, row: dict, options: dict) -> tuple[str, str]:
    """Spec 4.3: restate-the-question cleanup, option text -> letter, then the cascade."""
    parts = row["question"].rstrip("。").split("。")[-1].split("_")  # the last sentence, split on the blank
    if len(parts[0].strip()) > 4:
        response = response.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        response = response.replace(parts[-1], "")
    text = replace_options(response, row, strip="。", ignore_case=False, word_bounded=options.get("word_bounded", False))
    return extract_with_cascade(text, row, CHAT_RULES[options.get("ceval_chat_rules", "2023-08-25")])


class ChineseMultipleChoice(MultipleChoiceTask):
    """C-Eval and CMMLU share the 问题/答案 prompt, the letter ids and the chat extraction."""

    averaging = "macro"
    choice_strings = ("A", "B", "C", "D")  # the prompt ends in "答案：" (its own token); shots answer "A"

    def fewshot_prefix(self, subject: str, shots: list[dict]) -> str:
        return "".join(f"{self.question(s)}{s['answer']}\n\n" for s in shots)

    def question(self, row: dict) -> str:
        return chinese_question(row)

    def chat_message(self, row: dict) -> str:
        return f"{row['question']}\n\n" + "".join(f"{x}. {row[x]}\n" for x in LETTERS)

    def extract(self, response: str, row: dict, options: dict) -> tuple[str, str]:
        return extract_chinese(response, row, options)


class CEval(ChineseMultipleChoice):
    name, split, version = "ceval", "val", "qwen-2023-08"
    categories, extra_groups = CATEGORIES, {"Hard": HARD}

    def rows(self, data: DataSource, subject: str, split: str) -> list[dict]:
        if data.root is None:
            return [{k: r[k] for k in ("question", *LETTERS, "answer")} for r in data.hub("ceval/ceval-exam", subject, split)]
        path = data.path("ceval", split, f"{subject}_{split}.csv", what=f"subject {subject}")
        return subject_rows(data.read_csv(path), {k: k for k in ("question", *LETTERS, "answer")}, path)


TASK = CEval()
