"""CMMLU (Li et al. 2023): 67 subjects, 11,582 test questions; macro average.

Qwen-7B (original) reported: base 5-shot 58.8 (no category breakdown published). Qwen's script uses
the C-Eval prompt keyed on Question/Answer (spec 2.4). There is no original chat script for CMMLU:
chat mode here uses the C-Eval chat message and extraction.
"""
from ..data import DataSource
from ..multiple_choice import LETTERS, ChineseMultipleChoice, subject_rows

CATEGORIES = {  # a subject may sit in several categories; "China specific" overlaps the other four
    "STEM": ("anatomy", "astronomy", "college_actuarial_science", "college_engineering_hydrology",
             "college_mathematics", "college_medical_statistics", "computer_science", "conceptual_physics",
             "electrical_engineering", "elementary_mathematics", "genetics", "high_school_biology",
             "high_school_chemistry", "high_school_mathematics", "high_school_physics", "machine_learning", "virology"),
    "Humanities": ("arts", "chinese_history", "chinese_literature", "college_law", "global_facts", "international_law",
                   "jurisprudence", "logical", "marxist_theory", "philosophy", "professional_law", "world_history",
                   "world_religions"),
    "Social Science": ("ancient_chinese", "business_ethics", "chinese_civil_service_exam", "chinese_food_culture",
                       "chinese_foreign_policy", "chinese_teacher_qualification", "college_education", "economics",
                       "education", "elementary_chinese", "ethnology", "high_school_geography", "high_school_politics",
                       "journalism", "management", "marketing", "modern_chinese", "professional_accounting",
                       "professional_psychology", "public_relations", "security_study", "sociology"),
    "Other": ("agronomy", "chinese_driving_rule", "clinical_knowledge", "college_medicine", "computer_security",
              "construction_project_management", "elementary_commonsense", "elementary_information_and_technology",
              "food_science", "human_sexuality", "legal_and_moral_basis", "nutrition", "professional_medicine",
              "sports_science", "traditional_chinese_medicine"),
    "China specific": ("ancient_chinese", "chinese_civil_service_exam", "chinese_driving_rule", "chinese_food_culture",
                       "chinese_foreign_policy", "chinese_history", "chinese_literature", "chinese_teacher_qualification",
                       "construction_project_management", "elementary_chinese", "elementary_commonsense", "ethnology",
                       "high_school_politics", "modern_chinese", "traditional_chinese_medicine"),
}
COLUMNS = {"question": "Question", **{x: x for x in LETTERS}, "answer": "Answer"}


class CMMLU(ChineseMultipleChoice):
    name, split, version = "cmmlu", "test", "qwen-2023-08"
    categories = CATEGORIES

    def rows(self, data: DataSource, subject: str, split: str) -> list[dict]:
        if data.root is None:
            return [{k: r[v] for k, v in COLUMNS.items()} for r in data.hub("haonan-li/cmmlu", subject, split)]
        path = data.path("cmmlu", split, f"{subject}.csv", what=f"subject {subject}")
        return subject_rows(data.read_csv(path), COLUMNS, path)


TASK = CMMLU()
