"""C-Eval (Huang et al. 2023): 52 subjects, validation split (1,346 questions); macro average + Hard.

Qwen-7B (original) reported: base 5-shot val 60.8; chat 0-shot val 54.2. Prompts follow spec 2.3 / 4.3.
The test split has no public answers (leaderboard submission), so it is not scored here.
"""
from ..data import DataSource
from ..multiple_choice import LETTERS, ChineseMultipleChoice, subject_rows

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

class CEval(ChineseMultipleChoice):
    name, split, version = "ceval", "val", "qwen-2023-08"
    categories, extra_groups = CATEGORIES, {"Hard": HARD}
    # published.CHAT's note: Qwen-7B-Chat's number used the earlier regexes (the family's, November 2023, the default)
    published_options = {"7B chat": {"ceval_chat_rules": "2023-08-03"}}

    def rows(self, data: DataSource, subject: str, split: str) -> list[dict]:
        if data.root is None:
            return [{k: r[k] for k in ("question", *LETTERS, "answer")} for r in data.hub("ceval/ceval-exam", subject, split)]
        path = data.path("ceval", split, f"{subject}_{split}.csv", what=f"subject {subject}")
        return subject_rows(data.read_csv(path), {k: k for k in ("question", *LETTERS, "answer")}, path)


TASK = CEval()
