package server

import (
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/m2train/m2train/coordinator/fsm"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

func ts(ns int64) *timestamppb.Timestamp {
	if ns == 0 {
		return nil
	}
	return &timestamppb.Timestamp{Seconds: ns / 1e9, Nanos: int32(ns % 1e9)}
}

var jobStates = map[fsm.JobState]pb.JobState{
	fsm.JobQueued:    pb.JobState_JOB_STATE_QUEUED,
	fsm.JobRunning:   pb.JobState_JOB_STATE_RUNNING,
	fsm.JobSucceeded: pb.JobState_JOB_STATE_SUCCEEDED,
	fsm.JobFailed:    pb.JobState_JOB_STATE_FAILED,
	fsm.JobCancelled: pb.JobState_JOB_STATE_CANCELLED,
}

func stateFromPB(s pb.JobState) (fsm.JobState, bool) {
	for k, v := range jobStates {
		if v == s {
			return k, true
		}
	}
	return "", false
}

func checkpointPB(c fsm.Checkpoint) *pb.Checkpoint {
	return &pb.Checkpoint{Step: c.Step, Location: c.Location, Generation: c.Generation, CommittedAt: ts(c.CommittedAt)}
}

func (s *Server) jobPB(j *fsm.Job) *pb.Job {
	out := &pb.Job{
		Id:          j.ID,
		Name:        j.Spec.Name,
		State:       jobStates[j.State],
		Generation:  j.Generation,
		SpecYaml:    specYAML(j.Spec),
		SubmittedAt: ts(j.SubmittedAt),
		StartedAt:   ts(j.StartedAt),
		FinishedAt:  ts(j.FinishedAt),
		Message:     j.Message,
		Restarts:    int32(j.Restarts),
		WorldSize:   int32(j.World()),
		Progress: &pb.Progress{
			Step:         j.Progress.Step,
			TotalSteps:   int64(j.Spec.Schedule.TotalSteps),
			Loss:         j.Progress.Loss,
			TokensPerSec: j.Progress.TokensPerSec,
			GradNorm:     j.Progress.GradNorm,
			Lr:           j.Progress.LR,
			Generation:   j.Progress.Generation,
			UpdatedAt:    ts(j.Progress.UpdatedAt),
		},
	}
	if ck, ok := j.LastCheckpoint(); ok {
		out.LastCheckpoint = checkpointPB(ck)
	}
	for _, a := range j.Assignments {
		pa := &pb.Assignment{Rank: int32(a.Rank), DpRank: int32(a.DPRank), SpRank: int32(a.SPRank), WorkerId: a.WorkerID, Gpu: int32(a.GPU)}
		if w, ok := s.node.FSM().Worker(a.WorkerID); ok {
			pa.WorkerAddr = w.Addr
		}
		out.Assignments = append(out.Assignments, pa)
	}
	return out
}

func eventPB(e fsm.Event) *pb.Event {
	return &pb.Event{Seq: e.Seq, Time: ts(e.At), JobId: e.JobID, WorkerId: e.WorkerID, Type: e.Type, Message: e.Message}
}
